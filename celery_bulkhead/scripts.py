"""Lua scripts: package data in ``lua/``, run with ``EVALSHA``, reloaded on ``NOSCRIPT``.

Each script documents its KEYS/ARGV contract in its header.  :func:`load`
reads one once per process (with optional ``{{NAME}}`` substitutions, for
values fixed for a client's lifetime) and :func:`run` calls it: ``EVALSHA``
first, and after a Redis restart or ``SCRIPT FLUSH`` (``NOSCRIPT``) the
script is registered again and the call repeated, transparently.

Redis-only: this module imports redis-py, so only Redis backends import it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

__all__ = ["Script", "fragment", "load", "run"]


@dataclass(frozen=True)
class Script:
    """A Lua script's text and SHA1 (as bytes, ready for ``EVALSHA``)."""

    name: str
    text: str
    sha: bytes


@functools.lru_cache(maxsize=64)
def _template(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


def fragment(name: str) -> str:
    """The text of ``lua/<name>.lua``, to paste into scripts as a substitution."""
    return _template(name)


@functools.lru_cache(maxsize=64)
def load(name: str, substitutions: tuple[tuple[str, str], ...] = ()) -> Script:
    """The script ``lua/<name>.lua`` with each ``{{KEY}}`` replaced by its value."""
    text = _template(name)
    for key, value in substitutions:
        text = text.replace("{{" + key + "}}", value)
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest().encode())


def run(client: Any, script: Script, numkeys: bytes, *args: Any) -> Any:
    """``EVALSHA`` ``script`` on ``client``; on ``NOSCRIPT`` load it and call again."""
    try:
        return client.execute_command("EVALSHA", script.sha, numkeys, *args)
    except NoScriptError:
        client.script_load(script.text)
        return client.execute_command("EVALSHA", script.sha, numkeys, *args)
