"""Sphinx configuration for the celery-bulkhead documentation.

The pages are Markdown (MyST); the CLI reference comes from the click group
(sphinx-click), the API reference from the docstrings (autodoc + napoleon), and
the configuration reference from the code itself (``_ext/settings_reference.py``).

Build (offline, warnings are errors; ``-E`` re-reads every page, so a warning of a page
that did not change is reported again)::

    python -m sphinx -W --keep-going -E -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

# -- project metadata, from the installed package ------------------------------
# The docs describe the code in this checkout: build them after `pip install -e ".[docs]"`.

_DIST = metadata.metadata("celery-bulkhead")
project = _DIST["Name"]
author = _DIST["Author"] or "celery-bulkhead developers"
release = _DIST["Version"]
version = ".".join(release.split(".")[:2])
# No year: a build must not depend on the date it runs (reproducible output).
copyright = author

# -- extensions -----------------------------------------------------------------

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_click",
    # docs/_ext:
    "settings_reference",  # the configuration reference, read from the code
    "alert_runbooks",  # the shipped alert rules, each checked to have a runbook
    "repo_links",  # links to repository files outside docs/ (README.md, ...) as downloads
    "api_coverage",  # every name of celery_bulkhead.__all__ is on the API page
]
# No sphinx.ext.intersphinx: the build runs offline and fetches nothing.

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# Warnings are errors (`-W`), with two exceptions that change nothing for a reader and are
# common in ordinary Markdown (the pages are written by many hands): a heading that skips a
# level (it still renders), and a code block the highlighter cannot lex (it is shown as plain
# text). Broken links, missing pages or anchors, directives and autodoc still fail the build.
suppress_warnings = ["myst.header", "misc.highlighting_failure"]

# -- MyST -------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist"]
# `[text](page.md#some-heading)` links: an anchor for every heading level.
myst_heading_anchors = 6

# -- autodoc and napoleon ------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Docstrings use Google style ("Args:", "Attributes:", "Raises:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" as fields of their class: several errors share attribute names (pool, ...).
napoleon_use_ivar = True

# -- HTML ---------------------------------------------------------------------------

html_theme = "furo"
html_title = f"{project} {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
