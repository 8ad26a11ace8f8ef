"""Fail the build when a public name of ``celery_bulkhead`` is not on the API page.

The public API is ``celery_bulkhead.__all__`` (pinned by a test).  The API
page documents it name by name, in sections; this check makes sure a name
added to ``__all__`` cannot ship undocumented.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError

__all__ = ["setup"]

PACKAGE = "celery_bulkhead"


def _check(app: Sphinx, env: BuildEnvironment) -> None:
    import importlib

    public = getattr(importlib.import_module(PACKAGE), "__all__", [])
    documented = set(env.get_domain("py").objects)  # type: ignore[attr-defined]
    missing = [name for name in public if f"{PACKAGE}.{name}" not in documented]
    if missing:
        raise ExtensionError(
            f"{PACKAGE}.__all__ names {missing}, which the API page (docs/api.md) does not "
            "document: add an autoclass/autoexception/autofunction for each"
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
