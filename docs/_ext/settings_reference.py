"""The configuration reference, generated from the code so that it cannot drift from it.

```` ```{bulkhead-settings} pool ```` (in a MyST page) renders one table row per
setting of a model: ``app`` (the ``bulkhead_*`` app settings of
:mod:`celery_bulkhead.settings`), ``pool`` (:class:`celery_bulkhead.Pool`),
``tenant`` (:class:`celery_bulkhead.TenantLimit`) or ``breaker``
(:class:`celery_bulkhead.Breaker`): its name, default, what is allowed, and
what it means.

* The settings and their defaults are the dataclass fields of the code.
* "Allowed" is what the code itself says when it refuses a value: each model
  is built with a value that setting refuses, and the row shows the
  ``allowed`` text of the :class:`~celery_bulkhead.ConfigurationError` it
  raises, word for word.  Choices are rendered from the module constants
  (``ON_FULL_POLICIES``, ...), and numeric bounds are checked against them
  (``MAX_QUEUE``, ``MAX_PUBLISH_TIMEOUT``, ...).
* "Meaning" is the ``Args:`` entry of the class docstring (for app settings,
  which have no class docstring of their own, the note's ``meaning``).

:data:`NOTES` is the one hand-written part: for every field, what the code
cannot say by itself (a computed default, a rule between two settings).
**The build fails** (:class:`~sphinx.errors.ExtensionError`) when the code has
a field :data:`NOTES` does not describe, when :data:`NOTES` describes a field
the code no longer has, when a docstring lacks the field's ``Args:`` entry, or
when a field is not refused the way the constants say: the page cannot fall
behind the code silently.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Parser as RstParser
from docutils.utils import new_document
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective
from tables import table

import celery_bulkhead
from celery_bulkhead import Breaker, ConfigurationError, Pool, TenantLimit, breaker, tenants
from celery_bulkhead import pool as pool_module
from celery_bulkhead import settings as settings_module

__all__ = ["MODELS", "NOTES", "Note", "setup"]

_REFUSED = object()  # the default probe: a value of a type no setting accepts


@dataclass(frozen=True)
class Note:
    """The hand-written part of one setting's row (reStructuredText)."""

    #: Shown instead of the dataclass default (a computed or placeholder default).
    default: str | None = None
    #: Shown under what the code says is allowed (rules between settings, ...).
    extra: str | None = None
    #: What the setting means, for a class without an ``Args:`` docstring entry.
    meaning: str | None = None
    #: The refused value that makes the code state what is allowed.
    probe: Any = _REFUSED


NOTES: dict[str, dict[str, Note]] = {
    "app": {
        "pools": Note(
            default="required, unless ``Bulkhead(app, pools=[...])`` is given",
            extra="Each pool's settings are in :ref:`the Pool table <pool-settings>`.",
            meaning="The pools. ``pools=`` given to ``Bulkhead`` wins over the setting.",
        ),
        "publish_timeout": Note(
            extra="``Bulkhead(app, publish_timeout=...)`` wins over the setting, same range.",
            meaning="Longest time a pool publish keeps trying a broker that is down or "
            "frozen before it raises ``BrokerUnavailable``. On Redis also the transport's "
            "socket timeouts (unless the app set its own), and the timeout of every call "
            "to the tenant and breaker state.",
        ),
        "metrics_port": Note(
            default="``None`` (no metrics endpoint)",
            extra="Pool *i* (in declaration order, from 0) serves on port + *i*, so "
            "port + number of pools - 1 must be <= 65535 too.",
            meaning="First port of the worker metrics endpoints (Prometheus).",
        ),
        "metrics_host": Note(
            meaning="Address the worker metrics endpoints bind to. Bind elsewhere than "
            "loopback only on purpose.",
            probe="",
        ),
        "state_url": Note(
            default="the broker's URL when the broker is Redis; in-process on ``memory://``",
            extra="Required for a tenant limit or a breaker when the broker is not Redis.",
            meaning="The Redis that holds tenant buckets, in-flight leases and breaker "
            "state, shared by the whole fleet.",
        ),
    },
    "pool": {
        "name": Note(default="required (the only positional argument)"),
        "concurrency": Note(),
        "max_queue": Note(extra="A cap only on Redis, RabbitMQ and ``memory://``."),
        "on_full": Note(extra="See :doc:`policies`."),
        "block_timeout": Note(extra='Checked even when ``on_full`` is not ``"block"``.'),
        "tasks": Note(
            extra="Each pattern 1-200 characters of letters, digits, ``_ . -`` and the glob "
            "characters ``* ? [ ] !``, each pattern once; no two pools may claim one task.",
        ),
        "queue": Note(
            default='``"bulkhead.<name>"``',
            extra="Not another pool's queue, not ``task_default_queue``, not a queue the "
            "app already declares in ``task_queues``.",
        ),
        "time_limit": Note(
            extra='``None`` with ``worker_pool`` ``"threads"`` or ``"solo"`` '
            "(Celery does not enforce time limits there).",
        ),
        "soft_time_limit": Note(
            extra="Below ``time_limit`` when both are set; ``None`` with ``worker_pool`` "
            '``"threads"`` or ``"solo"``.',
        ),
        "prefetch_multiplier": Note(),
        "acks_late": Note(),
        "drain_timeout": Note(),
        "worker_pool": Note(extra='``"gevent"`` and ``"eventlet"`` need those packages.'),
        "tenant": Note(extra="Its settings: :ref:`the TenantLimit table <tenant-settings>`."),
        "breaker": Note(extra="Its settings: :ref:`the Breaker table <breaker-settings>`."),
    },
    "tenant": {
        "key": Note(default="required (the only positional argument)"),
        "rate": Note(
            extra="Or ``None`` (no rate limit). A limit needs a ``rate``, a "
            "``max_inflight``, or both.",
            probe=0,  # out of range: the refusal then states the range
        ),
        "burst": Note(default="one second's worth of ``rate``, at least 1"),
        "max_inflight": Note(),
        "on_limited": Note(extra="See :doc:`policies`."),
        "enforce": Note(extra="``max_inflight`` is always enforced at the worker."),
        "on_state_error": Note(extra="See :doc:`policies`."),
        "max_deferrals": Note(),
        "max_defer": Note(),
    },
    "breaker": {
        "fail_max": Note(),
        "reset_timeout": Note(),
        "exclude": Note(),
        "include": Note(),
        "name": Note(default="the pool's name"),
        "half_open_max_calls": Note(),
        "on_open": Note(extra="See :doc:`policies`."),
        "fail_fast_at_submit": Note(),
        "on_state_error": Note(extra="See :doc:`policies`."),
        "failure_window": Note(),
        "cache_seconds": Note(probe=0.01),  # below its minimum, which a type probe misses
        "listeners": Note(),
        "failure_rate_threshold": Note(
            extra="Either rule opens the breaker: ``fail_max`` failures within "
            "``failure_window``, or the rate. See :ref:`breaker-rates`.",
        ),
        "minimum_calls": Note(extra="Counted fleet-wide, over the sliding ``failure_window``."),
        "slow_call_duration": Note(
            extra="Measured in the worker's main process, from when it lets the task through "
            "to when the task ends: not its wait in the queue. See :ref:`breaker-rates`.",
        ),
        "slow_call_rate_threshold": Note(
            extra="Used only when ``slow_call_duration`` is set; a slow call that failed "
            "counts as a failure too.",
        ),
    },
}


# -- the models ----------------------------------------------------------------------


class _App:
    """Just enough of a Celery app for :func:`celery_bulkhead.settings.read`."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf


def _probe_app(name: str, value: Any) -> None:
    if name == "pools":
        pool_module.pools_from_setting(value)
    else:
        settings_module.read(_App({f"bulkhead_{name}": value}), pools={})


def _probe_pool(name: str, value: Any) -> None:
    Pool(value) if name == "name" else Pool("probe", **{name: value})


def _probe_tenant(name: str, value: Any) -> None:
    if name == "key":
        TenantLimit(value, rate=1)
    else:
        TenantLimit("tenant_id", **{"rate": 1, name: value})


def _probe_breaker(name: str, value: Any) -> None:
    Breaker(**{name: value})


@dataclass(frozen=True)
class Model:
    """One settings model: where its fields are, how to make it refuse a value."""

    cls: type
    probe: Callable[[str, Any], None]
    #: How its errors name a setting: ``"tenant.rate"``, ``"bulkhead_metrics_port"``.
    setting: Callable[[str], str] = lambda name: name
    #: How the table names a setting.
    display: Callable[[str], str] = lambda name: name
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    django: bool = False


def _app_fields() -> list[dataclasses.Field[Any]]:
    """The app settings: the ``Settings`` fields, which must match the module's names."""
    found = dataclasses.fields(settings_module.Settings)
    names = {
        value
        for constant, value in vars(settings_module).items()
        if constant.isupper() and isinstance(value, str) and value.startswith("bulkhead_")
    }
    if names != {f"bulkhead_{f.name}" for f in found}:
        raise _drift(f"celery_bulkhead.settings names {sorted(names)}, not the Settings fields")
    return list(found)


MODELS: dict[str, Model] = {
    "app": Model(
        settings_module.Settings,
        _probe_app,
        setting=lambda name: f"bulkhead_{name}",
        display=lambda name: f"bulkhead_{name}",
        bounds={
            "publish_timeout": settings_module.MAX_PUBLISH_TIMEOUT,
            "metrics_port": settings_module.MAX_PORT,
        },
        django=True,
    ),
    "pool": Model(
        Pool,
        _probe_pool,
        choices={"on_full": pool_module.ON_FULL_POLICIES, "worker_pool": pool_module.WORKER_POOLS},
        bounds={
            "concurrency": pool_module.MAX_CONCURRENCY,
            "max_queue": pool_module.MAX_QUEUE,
            "block_timeout": pool_module.MAX_BLOCK_TIMEOUT,
            "time_limit": pool_module.MAX_TIME_LIMIT,
            "soft_time_limit": pool_module.MAX_TIME_LIMIT,
            "prefetch_multiplier": pool_module.MAX_PREFETCH,
            "drain_timeout": pool_module.MAX_DRAIN_TIMEOUT,
        },
    ),
    "tenant": Model(
        TenantLimit,
        _probe_tenant,
        setting=lambda name: f"tenant.{name}",
        choices={
            "on_limited": tenants.ON_LIMITED,
            "enforce": tenants.ENFORCE,
            "on_state_error": tenants.ON_STATE_ERROR,
        },
        bounds={
            "rate": tenants.MAX_RATE,
            "burst": tenants.MAX_BURST,
            "max_inflight": tenants.MAX_INFLIGHT,
        },
    ),
    "breaker": Model(
        Breaker,
        _probe_breaker,
        setting=lambda name: f"breaker.{name}",
        choices={"on_open": breaker.ON_OPEN, "on_state_error": breaker.ON_STATE_ERROR},
        bounds={
            "minimum_calls": breaker.MAX_MINIMUM_CALLS,
            "slow_call_duration": breaker.MAX_SLOW_CALL_DURATION,
        },
    ),
}


# -- reading the code -----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One setting, as the table shows it."""

    name: str
    default: str | nodes.Node  # reStructuredText (a note) or a literal (the code's default)
    allowed: str  # the code's own words
    choices: tuple[str, ...]
    note: Note
    meaning: str  # reStructuredText


def _drift(message: str) -> ExtensionError:
    return ExtensionError(
        f"configuration reference out of date: {message} "
        "(update NOTES in docs/_ext/settings_reference.py, or the code)"
    )


def _docstring_args(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style class docstring, one line each."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    inside = False
    for line in (inspect.getdoc(cls) or "").splitlines():
        if line.strip() == "Args:":
            inside = True
        elif inside and line and not line.startswith(" "):
            break  # the next section
        elif inside and (match := re.match(r"^    (\w+): ?(.*)$", line)):
            current = entries.setdefault(match.group(1), [match.group(2)])
        elif inside and current is not None and line.strip():
            current.append(line.strip())
    return {name: " ".join(parts) for name, parts in entries.items()}


def _allowed(key: str, model: Model, name: str, probe: Any) -> str:
    """What the code says is allowed for ``name``: the words of its refusal."""
    try:
        model.probe(name, object() if probe is _REFUSED else probe)
    except ConfigurationError as error:
        if error.setting != model.setting(name):
            raise _drift(f"{key}.{name}: the probe was refused as {error.setting!r}") from error
        allowed = error.allowed
    else:
        raise _drift(f"{key}.{name} accepted the probe value {probe!r}")
    for option in model.choices.get(name, ()):
        if option not in allowed:
            raise _drift(f"{key}.{name}: {allowed!r} omits the choice {option!r}")
    bound = model.bounds.get(name)
    if bound is not None and not _states(allowed, bound):
        raise _drift(f"{key}.{name}: {allowed!r} does not state the module's bound {bound!r}")
    return allowed


def _states(text: str, bound: float) -> bool:
    """Whether ``text`` spells ``bound``: ``2147483647``, ``3600`` (of 3600.0), ``1e+06``."""
    numbers = set(re.findall(r"\d[\d.e+-]*", text))
    return bool(numbers & {f"{bound:g}", str(int(bound))})


def _spelled(text: str) -> str:
    """``"<= 604800"`` → ``"<= 604800 (7 days)"``: bounds of seconds, for a reader."""
    if "second" not in text:
        return text

    def spell(match: re.Match[str]) -> str:
        value = float(match.group(1))
        for size, unit in ((86_400, "day"), (3600, "hour")):
            if value >= size and value % size == 0:
                count = int(value // size)
                return f"{match.group(0)} ({count} {unit}{'s' if count > 1 else ''})"
        return match.group(0)

    return re.sub(r"<= (\d+(?:\.\d+)?)", spell, text)


def _python(value: Any) -> str:
    """A value as a user types it (strings in double quotes, as everywhere in the docs)."""
    return '"' + value.replace('"', '\\"') + '"' if isinstance(value, str) else repr(value)


def rows(key: str) -> list[Row]:
    """The settings of model ``key``, checked against :data:`NOTES` and the constants."""
    model = MODELS[key]
    fields = _app_fields() if key == "app" else list(dataclasses.fields(model.cls))
    notes = NOTES.get(key, {})
    names = [f.name for f in fields]
    if missing := [name for name in names if name not in notes]:
        raise _drift(f"{key}: the code has settings {missing} that NOTES does not describe")
    if gone := [name for name in notes if name not in names]:
        raise _drift(f"{key}: NOTES describes settings {gone} that the code no longer has")
    documented = _docstring_args(model.cls)
    result = []
    for f in fields:
        note = notes[f.name]
        meaning = documented.get(f.name) or note.meaning
        if not meaning:
            raise _drift(f"{model.cls.__name__}'s docstring has no Args: entry for {f.name!r}")
        if note.default is not None:
            default: str | nodes.Node = note.default
        elif f.default is dataclasses.MISSING:
            default = "required"
        else:
            default = nodes.literal(text=_python(f.default))
        result.append(
            Row(
                name=model.display(f.name),
                default=default,
                allowed=_spelled(_allowed(key, model, f.name, note.probe)),
                choices=tuple(model.choices.get(f.name, ())),
                note=note,
                meaning=meaning,
            )
        )
    return result


# -- the directive -------------------------------------------------------------------


class SettingsDirective(SphinxDirective):
    """``{bulkhead-settings} app|pool|tenant|breaker``: one model's settings table."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        key = self.arguments[0].strip()
        if key not in MODELS:
            raise self.error(f"bulkhead-settings: unknown model {key!r}; one of {sorted(MODELS)}")
        # Rebuild the page when the code it describes changes.
        for module in (celery_bulkhead, settings_module, pool_module, tenants, breaker):
            self.env.note_dependency(inspect.getsourcefile(module) or "")
        self.env.note_dependency(__file__)
        body = [self._row(row, MODELS[key].django) for row in rows(key)]
        return [table(["Setting", "Default", "Allowed", "Meaning"], [18, 18, 34, 40], body)]

    def _row(self, row: Row, django: bool) -> list[nodes.Node]:
        name = nodes.container("", nodes.paragraph("", "", nodes.literal(text=row.name)))
        if django:
            env_name = "CELERY_" + row.name.upper()
            name += nodes.paragraph("", "Django: ", nodes.literal(text=env_name))
        if isinstance(row.default, str):
            default = nodes.container("", *self._rst(row.default))
        else:
            default = nodes.paragraph("", "", row.default)
        allowed = nodes.paragraph()
        if row.choices:
            allowed += nodes.Text("One of ")
            for index, option in enumerate(row.choices):
                if index:
                    allowed += nodes.Text(", ")
                allowed += nodes.literal(text=_python(option))
        else:
            allowed += nodes.Text(row.allowed[:1].upper() + row.allowed[1:])
        extra = self._rst(row.note.extra) if row.note.extra else []
        meaning = row.meaning
        if meaning[:1].isalpha():
            meaning = meaning[:1].upper() + meaning[1:]
        return [
            name,
            default,
            nodes.container("", allowed, *extra),
            nodes.container("", *self._rst(meaning)),
        ]

    def _rst(self, text: str) -> list[nodes.Node]:
        """reStructuredText (docstrings, notes) as nodes of this (Markdown) document."""
        document = new_document(self.state.document["source"], self.state.document.settings)
        document.reporter = self.state.document.reporter
        RstParser().parse(text, document)
        return list(document.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("bulkhead-settings", SettingsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
