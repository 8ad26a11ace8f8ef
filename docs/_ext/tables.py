"""A docutils table from rows of nodes: what the generated reference pages share."""

from __future__ import annotations

from collections.abc import Iterable

from docutils import nodes

__all__ = ["table"]


def table(headers: list[str], widths: list[int], body: Iterable[list[nodes.Node]]) -> nodes.table:
    """A table with one header row; each cell of ``body`` is a node (a paragraph, ...)."""
    result = nodes.table(classes=["bulkhead-reference"])
    group = nodes.tgroup(cols=len(headers))
    result += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    row = nodes.row()
    for header in headers:
        row += nodes.entry("", nodes.paragraph(text=header))
    head += row
    group += head
    tbody = nodes.tbody()
    for cells in body:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell
            row += entry
        tbody += row
    group += tbody
    return result
