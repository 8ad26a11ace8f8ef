"""Which publishes continue admitted work, so that a cap never refuses them.

A capped pool refuses *new* work when it is full.  It must never refuse the
rest of work it already admitted: a task's own retry, the next step of a
chain (a task, or every member of a group or chord header), a link callback
or errback, a chord's body or the chord's errback.  Refusing those would
lose work the user was told was queued.

The follow-ups of a message are known when it is published: its body
carries them (``callbacks``, ``errbacks``, ``chain``, ``chord``).
:func:`mark_follow_ups` gives each of them, nested ones included, a task id
and the message header :data:`celery_bulkhead.message.FOLLOW_UP` holding that id (in a copy:
the caller's signatures are not changed).  Whoever publishes them later, a
task in a prefork child, the worker's main process after a hard time limit,
a result backend completing a chord, publishes them with the header, and a
message whose header names its own id passes.

A result backend without native chords (database, file, anything that uses
``celery.chord_unlock``) does not publish the body from a header task: at
submit time, before the header, it publishes ``celery.chord_unlock`` to the
*body's* queue, with the body as an argument (not in the embed, so never
marked) and the body's ``headers`` option as its own.  That message stands
for the body, so a ``celery.chord_unlock`` message is never refused, wherever
it is published; the body it publishes later passes as a follow-up of the
running ``chord_unlock`` (below).

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

import uuid
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from . import message

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["bypass_reason", "mark_follow_ups", "signature_ids"]


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


def _is_marked(options: Mapping[str, Any]) -> bool:
    """A task already marked with its id, with no callbacks left to mark."""
    headers, task_id = options.get("headers"), options.get("task_id")
    return (
        bool(task_id)
        and isinstance(headers, Mapping)
        and headers.get(message.FOLLOW_UP) == task_id
        and not options.get("link")
        and not options.get("link_error")
    )


def _mark(value: Any) -> Any:
    """A copy of a signature (or a list of them) whose every task carries the header.

    A task's header holds its own id, so the header says nothing about any
    other publish: code that forwards ``self.request.headers`` to new work
    does not smuggle that work past the cap.  A group, chain or chord that
    has headers of its own gets the ids of all its tasks: Celery applies a
    container's ``headers`` option to its members in place of theirs.
    """
    if isinstance(value, (list, tuple)):
        return [_mark(sig) for sig in value]
    if not isinstance(value, Mapping):
        return value
    options = value.get("options") or {}
    kwargs = value.get("kwargs") or {}
    if not isinstance(options, Mapping) or not isinstance(kwargs, Mapping):
        return value  # not a signature Celery builds: left as it is
    nested_keys = _NESTED.get(str(value.get("task")), ())
    if not nested_keys and _is_marked(options):
        return value  # marked when an earlier step was published
    marked = dict(options)
    nested = {key: _mark(kwargs[key]) for key in nested_keys if kwargs.get(key)}
    headers = options.get("headers")
    if not nested_keys:
        task_id = options.get("task_id") or str(uuid.uuid4())
        marked["task_id"] = task_id
        marked["headers"] = {**(headers if isinstance(headers, Mapping) else {})}
        marked["headers"][message.FOLLOW_UP] = task_id
    elif isinstance(headers, Mapping):
        members = [m for v in nested.values() for m in (v if isinstance(v, list) else [v])]
        marked["headers"] = {**headers, message.FOLLOW_UP: sorted(signature_ids(members))}
    for key in ("link", "link_error"):  # a follow-up's own callbacks and errbacks
        if options.get(key):
            marked[key] = _mark(options[key])
    sig = dict(value)
    sig["options"] = marked
    if nested:
        sig["kwargs"] = {**kwargs, **nested}
    return sig


def _marked_for(marker: Any, task_id: Any) -> bool:
    if isinstance(marker, (list, tuple)):
        return task_id in marker
    return marker is not None and marker == task_id


def mark_follow_ups(task_message: Any) -> None:
    """Give every follow-up a task message carries the :data:`celery_bulkhead.message.FOLLOW_UP`.

    ``message`` is Celery's ``task_message`` (protocol 2: the body is
    ``(args, kwargs, embed)``); the embed's entries are replaced by marked
    copies.
    """
    embed = message.embed(task_message)
    if embed is None:
        return
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
    if headers.get("task") == _CHORD_UNLOCK:
        # The body's stand-in: result backends without native chords publish it at
        # submit time, before the header, to the *body's* queue.
        return "continuation"
    # The headers= option replaces same-named message headers when Celery merges it.
    marker = (extra_headers or {}).get(message.FOLLOW_UP, headers.get(message.FOLLOW_UP))
    if marker is not None and _marked_for(marker, headers.get("id")):
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
