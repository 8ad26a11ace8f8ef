"""Markdown links from the docs to files of the repository outside ``docs/``.

The pages link to ``../README.md``, ``../monitoring/README.md``,
``../example_project/``, ``../bench/...``: files a reader of the repository can
open, but which are not pages of the site.  MyST already turns a link to such a
file into a download when the file is not Markdown; a Markdown file (or a
directory) outside ``docs/`` would instead be an unknown document and fail the
build.  This transform makes those links downloads too (a directory: its
``README.md``, or, without one, the link's words with no link), so the built site
links to a copy of the file, offline.

Only files inside the repository (the parent of ``docs/``) are linked; a link
to a file that does not exist still fails the build.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform

__all__ = ["setup"]


class RepositoryLinks(SphinxTransform):
    """Turn MyST links to repository files outside the docs into download links."""

    default_priority = 500

    def apply(self, **kwargs: Any) -> None:
        srcdir = Path(self.env.srcdir).resolve()
        root = srcdir.parent
        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") != "myst":
                continue
            target = self._outside_file(node, srcdir, root)
            if target is None:
                continue
            if target.is_dir():
                # A folder without a README: nothing to link to offline; keep the words.
                text = node.astext().strip() or Path(os.path.relpath(target, srcdir)).as_posix()
                node.replace_self(nodes.literal(text, text))
                continue
            relative = Path(os.path.relpath(target, srcdir)).as_posix()
            link = addnodes.download_reference(
                "",
                "",
                refdomain=None,
                reftype="myst",
                reftarget="/" + relative,  # "/..." is relative to the source directory
                refdoc=node.get("refdoc", self.env.docname),
                refexplicit=node.get("refexplicit", False),
            )
            link.source, link.line = node.source, node.line
            if node.astext().strip():
                for child in node.children:
                    if isinstance(child, nodes.Element):
                        child["classes"] = [*child.get("classes", []), "download"]
                link.extend(node.children)
            else:
                link += nodes.literal(relative, relative, classes=["xref", "download", "myst"])
            node.replace_self(link)

    def _outside_file(self, node: addnodes.pending_xref, srcdir: Path, root: Path) -> Path | None:
        """The repository file or folder (outside the docs) a MyST link names, if it exists."""
        target = str(node.get("reftarget", ""))
        if not target or "://" in target:
            return None
        candidates: list[Path] = []
        if node.get("refdomain") == "doc":
            if target in self.env.found_docs:
                return None
            base = Path(target) if os.path.isabs(target) else srcdir / target
            candidates = [Path(f"{base}{suffix}") for suffix in self.config.source_suffix]
        elif not node.get("refdomain"):
            path = target.split("#", 1)[0]
            if not path:
                return None
            base = (srcdir / Path(self.env.docname).parent / path).resolve()
            candidates = [base / "README.md", base] if base.is_dir() else [base]
        for candidate in candidates:
            resolved = candidate.resolve()
            if (
                resolved.exists()
                and resolved.is_relative_to(root)
                and not resolved.is_relative_to(srcdir)
            ):
                return resolved
        return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_transform(RepositoryLinks)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
