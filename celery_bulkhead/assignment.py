"""Which pool a task belongs to: its decorator option first, then name patterns.

A task is assigned explicitly with ``@app.task(bulkhead="name")`` (the option
becomes the ``bulkhead`` attribute of the task class, and the task's name is
recorded when it is decorated), or implicitly when its
name matches a pool's ``tasks=[...]`` glob pattern.  The explicit assignment
wins.  A name that matches the patterns of two pools is a configuration error:
guessing would route work to the wrong workers.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping
from difflib import get_close_matches
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

from .errors import ConfigurationError
from .pool import Pool

__all__ = ["TASK_ATTRIBUTE", "Assignment"]

#: The task option/class attribute that names a task's pool.
TASK_ATTRIBUTE = "bulkhead"


#: Task functions declared with ``@app.task(bulkhead=...)``, and the assignments
#: (one per Bulkhead) they were declared through.  Celery registers a task
#: declared with ``shared=True`` (its default) on every app of the process as
#: it is finalized; there the ``bulkhead`` attribute names a pool of another
#: app's Bulkhead, and the task is in no pool of this one.
_DECLARED: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Assignment]] = weakref.WeakKeyDictionary()


def _function_of(task: Any) -> Any:
    """The function a task object was made from (Celery's ``_task_from_fun``), if any."""
    run = vars(type(task)).get("__wrapped__")
    return getattr(run, "__func__", run)  # unbound (bind=False: a staticmethod)


class Assignment:
    """Resolves task names (and task objects) to pools."""

    def __init__(self, pools: Iterable[Pool]) -> None:
        self._pools: dict[str, Pool] = {}
        for pool in pools:
            self._pools[pool.name] = pool
        self._patterns: tuple[tuple[str, Pool], ...] = tuple(
            (pattern, pool) for pool in self._pools.values() for pattern in pool.tasks
        )
        self._check_overlaps()
        # Task names assigned by decorator, recorded when the task is decorated:
        # app.send_task() does not finalize the app, so a lazily declared task
        # is not in the registry yet when its name is routed.
        self._named: dict[str, Pool] = {}
        # Task names are few in practice, but send_task accepts any string:
        # bound the cache so a stream of made-up names cannot grow memory.
        self._match = lru_cache(maxsize=4096)(self._match_uncached)

    @property
    def pools(self) -> Mapping[str, Pool]:
        return self._pools

    def _check_overlaps(self) -> None:
        # Two globs overlap in general in ways that are hard to decide; the
        # cases people write (a duplicate, or one pattern covering the other,
        # "reports.*" vs "reports.daily") are caught here, and any task name
        # that still matches two pools is refused when it is resolved.
        for i, (first, first_pool) in enumerate(self._patterns):
            for second, second_pool in self._patterns[i + 1 :]:
                if first_pool is second_pool:
                    continue
                if first == second or fnmatchcase(first, second) or fnmatchcase(second, first):
                    raise ConfigurationError(
                        second_pool.name,
                        "tasks",
                        second,
                        "patterns no other pool claims",
                        detail=f"pool {first_pool.name!r} already claims {first!r}",
                    )

    def pool(
        self,
        name: Any,
        *,
        setting: str = TASK_ATTRIBUTE,
        task: str | None = None,
        module: str | None = None,
    ) -> Pool:
        """Return the pool called ``name`` or raise a ConfigurationError.

        ``task`` and ``module`` name the task that asked for the pool, when
        there is one: the error then says which task to fix and where it is.
        """
        try:
            return self._pools[name]
        except (KeyError, TypeError):
            raise self._unknown(name, setting, task, module) from None

    def _unknown(
        self, name: Any, setting: str, task: str | None, module: str | None
    ) -> ConfigurationError:
        allowed = (
            "one of " + ", ".join(repr(n) for n in self._pools)
            if self._pools
            else "no pools are declared"
        )
        detail = "unknown pool"
        if isinstance(name, str):
            close = get_close_matches(name, list(self._pools), n=1)
            if close:
                detail += f"; did you mean {close[0]!r}?"
        error = ConfigurationError(None, setting, name, allowed, detail=detail)
        if task is not None:
            # The error is about a task, not a pool: say which one and where
            # it is defined, so a typo in one of many task modules is found.
            where = f"task {task!r}" + (f" (module {module})" if module else "")
            error.args = (f"{where}: {error}",)
        return error

    def assign(
        self, task_name: str, pool_name: Any, *, module: str | None = None, function: Any = None
    ) -> Pool:
        """Record that ``task_name`` (defined in ``module``) was decorated into ``pool_name``.

        ``function``: the decorated function, remembered as declared through
        this assignment (see :data:`_DECLARED`).
        """
        pool = self.pool(pool_name, task=task_name, module=module)
        self._named[task_name] = pool
        if function is not None:
            # Not weak-referenceable (a builtin): judged as any other task.
            with contextlib.suppress(TypeError):
                _DECLARED.setdefault(function, weakref.WeakSet()).add(self)
        return pool

    def _declared_elsewhere(self, task: Any) -> bool:
        """Whether ``task`` was declared through another Bulkhead's app, never this one's."""
        try:
            through = _DECLARED.get(_function_of(task))
        except TypeError:
            return False
        return through is not None and len(through) > 0 and self not in through

    def _match_uncached(self, name: str) -> Pool | None:
        matches = [pool for pattern, pool in self._patterns if fnmatchcase(name, pattern)]
        unique = {pool.name: pool for pool in matches}
        if len(unique) > 1:
            raise ConfigurationError(
                None,
                "tasks",
                name,
                "a task name matched by the patterns of one pool only",
                detail="matched by pools " + ", ".join(repr(n) for n in unique),
            )
        return matches[0] if matches else None

    def resolve(self, name: str, task: Any = None) -> Pool | None:
        """The pool for a task name (and, when known, its task object), or None.

        ``None`` means the task is in no pool and keeps Celery's own routing.
        """
        explicit = getattr(task, TASK_ATTRIBUTE, None) if task is not None else None
        if explicit is not None:
            try:
                return self._pools[explicit]
            except (KeyError, TypeError):
                if self._declared_elsewhere(task):
                    return None  # another app's pool, shared into this app by Celery
                module = getattr(task, "__module__", None)
                module = module if isinstance(module, str) else None
                raise self._unknown(explicit, TASK_ATTRIBUTE, str(name), module) from None
        if not isinstance(name, str):
            return None
        named = self._named.get(name)
        if named is not None:
            return named
        return self._match(name)
