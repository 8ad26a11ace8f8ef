"""Which publishes continue admitted work, so that a cap never refuses them.

A capped pool refuses *new* work when it is full.  It must never refuse the
rest of work it already admitted: a task's own retry, the next step of a
chain (a task, or every member of a group or chord header), a link callback
or errback, a chord's body or the chord's errback.  Refusing those would
lose work the user was told was queued.

The follow-ups of a message are known when it is published: its body
carries them (``callbacks``, ``errbacks``, ``chain``, ``chord``).
:func:`mark_follow_ups` gives each of them, nested ones included, the
message header :data:`FOLLOW_UP_HEADER` (in a copy: the caller's signatures
are not changed).  Whoever publishes them later, a task in a prefork child,
the worker's main process after a hard time limit, a result backend
completing a chord, publishes them with the header, and they pass.

For messages published by a process without the ``Bulkhead`` (so without
the header), a worker also recognises:

* a retry: the running task's id (``Task.retry`` re-sends it) or a non-zero
  ``retries`` header;
* an id found in the running task's next chain step, callbacks, errbacks or
  chord body, searched through nested groups, chains and chords (Celery
  gives chain steps and chord bodies their ids when the canvas is applied);
* everything ``celery.chord_unlock`` publishes (a chord's body);
* on Celery 5.7 and later, everything Celery dispatches after a task
  finished (its callbacks, chain step and chord body), which Celery marks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["FOLLOW_UP_HEADER", "bypass_reason", "mark_follow_ups", "signature_ids"]

#: Message header of a publish that continues admitted work: never refused.
FOLLOW_UP_HEADER = "bulkhead_follow_up"

_CHORD_UNLOCK = "celery.chord_unlock"
_NESTED = {
    "celery.group": ("tasks",),
    "celery.chain": ("tasks",),
    "celery.chord": ("header", "body"),
}
_EMBEDDED = ("callbacks", "errbacks", "chain", "chord")

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


def _mark(value: Any) -> Any:
    """A copy of a signature (or a list of them) whose every task carries the header."""
    if isinstance(value, (list, tuple)):
        return [_mark(sig) for sig in value]
    if not isinstance(value, Mapping):
        return value
    sig = dict(value)
    options = dict(value.get("options") or {})
    if str(value.get("task")) not in _NESTED:
        # Only on tasks: a group's or chain's own options override its
        # members' when applied, and must keep whatever headers the user gave.
        headers = options.get("headers")
        options["headers"] = {**(headers if isinstance(headers, Mapping) else {})}
        options["headers"][FOLLOW_UP_HEADER] = True
    for key in ("link", "link_error"):  # a follow-up's own callbacks and errbacks
        if options.get(key):
            options[key] = _mark(options[key])
    sig["options"] = options
    kwargs = value.get("kwargs") or {}
    nested = {
        key: _mark(kwargs[key])
        for key in _NESTED.get(str(value.get("task")), ())
        if kwargs.get(key)
    }
    if nested:
        sig["kwargs"] = {**kwargs, **nested}
    return sig


def mark_follow_ups(message: Any) -> None:
    """Give every follow-up a task message carries the :data:`FOLLOW_UP_HEADER`.

    ``message`` is Celery's ``task_message`` (protocol 2: the body is
    ``(args, kwargs, embed)``); the embed's entries are replaced by marked
    copies.
    """
    body = message[2]
    if not isinstance(body, tuple) or len(body) != 3 or not isinstance(body[2], dict):
        return
    embed = body[2]
    for key in _EMBEDDED:
        if embed.get(key):
            embed[key] = _mark(embed[key])


def bypass_reason(
    app: Celery,
    headers: Mapping[str, Any],
    in_worker: bool = True,
    extra_headers: Mapping[str, Any] | None = None,
) -> str | None:
    """Why this message must never be refused (``"retry"``/``"continuation"``), or None.

    ``extra_headers`` are the headers the publish adds to the message (the
    ``headers=`` option, which Celery merges in after admission).
    ``in_worker=False`` (a producer process, where no task runs) skips the
    look at the running task.
    """
    if headers.get("retries"):
        return "retry"
    if headers.get(FOLLOW_UP_HEADER) or (extra_headers and extra_headers.get(FOLLOW_UP_HEADER)):
        return "continuation"
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
