"""Which publishes continue admitted work, so that a cap never refuses them.

A capped pool refuses *new* work when it is full.  It must never refuse the
rest of work it already admitted: a task's own retry, the next step of a
chain (a task or every member of a group), a link callback or errback, a
chord's body.  Refusing those would lose work the user was told was queued.

Such a publish is recognised in the worker that makes it:

* a retry carries the running task's id (``Task.retry`` re-sends it) or a
  non-zero ``retries`` header;
* a follow-up carries an id found in the running task's ``chain`` (next
  step), ``callbacks``, ``errbacks`` or ``chord``, searched through nested
  groups, chains and chords;
* everything ``celery.chord_unlock`` publishes is a chord's body;
* on Celery 5.7 and later, everything Celery itself dispatches after a task
  finished (its callbacks, chain step and chord body) is marked by Celery.

Celery freezes the ids of chain steps and chord bodies when the canvas is
applied, but not those of link callbacks and errbacks
(``apply_async(link=cb.s())``): a fresh id is drawn only when the worker
publishes them.  :func:`freeze_follow_ups` therefore gives every callback
and errback an id in the message being published (a copy: the caller's
signatures are not changed), so that the worker can recognise them later.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["bypass_reason", "freeze_follow_ups", "signature_ids"]

_CHORD_UNLOCK = "celery.chord_unlock"
_NESTED = {
    "celery.group": ("tasks",),
    "celery.chain": ("tasks",),
    "celery.chord": ("header", "body"),
}

# Celery >= 5.7 marks the publishes it makes for a finished task (its callbacks,
# chain step, chord body) with this context variable; older Celery: ids alone decide.
try:
    from celery.app import amqp as _celery_amqp

    # Private in Celery, hence unknown to the stubs.
    _dispatching: ContextVar[bool] | None = _celery_amqp._callback_publish_retry  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - Celery < 5.7
    _dispatching = None


def _children(sig: Mapping[str, Any]) -> Iterable[Any]:
    kwargs = sig.get("kwargs") or {}
    for key in _NESTED.get(str(sig.get("task")), ()):
        nested = kwargs.get(key)
        if isinstance(nested, Mapping):
            yield nested
        elif isinstance(nested, (list, tuple)):
            yield from nested


def signature_ids(signatures: Iterable[Any] | None) -> set[str]:
    """Task ids of ``signatures`` and of every task nested in their groups, chains, chords."""
    ids: set[str] = set()
    pending = list(signatures or ())
    while pending:
        sig = pending.pop()
        if not isinstance(sig, Mapping):
            continue
        task_id = (sig.get("options") or {}).get("task_id")
        if task_id:
            ids.add(task_id)
        pending.extend(_children(sig))
    return ids


def _with_ids(sig: Any) -> Any:
    """A copy of ``sig`` in which every task (nested ones too) has a task id.

    Groups, chains and chords get none themselves: Celery reads such an id
    as the group's id or the id of the last result, not as a follow-up.
    """
    if not isinstance(sig, Mapping):
        return sig
    frozen = dict(sig)
    options = sig.get("options") or {}
    if str(sig.get("task")) not in _NESTED and not options.get("task_id"):
        frozen["options"] = {**options, "task_id": str(uuid.uuid4())}
    kwargs = sig.get("kwargs") or {}
    nested = {
        key: (
            _with_ids(kwargs[key])
            if isinstance(kwargs[key], Mapping)
            else [_with_ids(child) for child in kwargs[key]]
        )
        for key in _NESTED.get(str(sig.get("task")), ())
        if isinstance(kwargs.get(key), (Mapping, list, tuple))
    }
    if nested:
        frozen["kwargs"] = {**kwargs, **nested}
    return frozen


def freeze_follow_ups(message: Any) -> None:
    """Give the link callbacks and errbacks of a task message ids of their own.

    ``message`` is Celery's ``task_message`` (protocol 2: the body is
    ``(args, kwargs, embed)``); the embed's lists are replaced by copies.
    """
    body = message[2]
    if not isinstance(body, tuple) or len(body) != 3 or not isinstance(body[2], dict):
        return
    embed = body[2]
    for key in ("callbacks", "errbacks"):
        signatures = embed.get(key)
        if signatures:
            embed[key] = [_with_ids(sig) for sig in signatures]


def bypass_reason(app: Celery, headers: Mapping[str, Any], in_worker: bool = True) -> str | None:
    """Why this message must never be refused (``"retry"``/``"continuation"``), or None.

    ``in_worker=False`` (a producer process, where no task runs) skips the look
    at the running task.
    """
    if headers.get("retries"):
        return "retry"
    if not in_worker:
        return None
    if _dispatching is not None and _dispatching.get():
        return "continuation"
    task = app.current_worker_task
    if task is None:
        return None
    request = task.request
    task_id = headers.get("id")
    if task_id is not None and task_id == request.id:
        return "retry"
    if getattr(request, "task", None) == _CHORD_UNLOCK:
        return "continuation"
    follow_ups = signature_ids((request.chain or [])[-1:])
    follow_ups |= signature_ids(request.callbacks)
    follow_ups |= signature_ids(request.errbacks)
    if request.chord:
        follow_ups |= signature_ids([request.chord])
    if task_id in follow_ups:
        return "continuation"
    return None
