"""The ``bulkhead-alerts`` directive: the shipped alert rules, each linked to its runbook.

```` ```{bulkhead-alerts} ```` renders every rule of
``monitoring/prometheus/alerts.yml`` (name, severity, ``for``, summary) as a
table.  Each alert links to its runbook: a section of the same page whose
title is the alert's name (```` ### `BulkheadQueueNearCap` ````).  **The build
fails** when an alert has no such section, so a rule added to ``alerts.yml``
cannot ship without its runbook.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective
from tables import table

__all__ = ["ALERTS_FILE", "setup"]

#: Relative to the repository root (the parent of the docs directory).
ALERTS_FILE = Path("monitoring") / "prometheus" / "alerts.yml"


class alert_table(nodes.General, nodes.Element):  # docutils names nodes in lower case
    """The alerts table, until the whole page is read and its links can be resolved."""


def _alerts(root: Path) -> list[dict[str, Any]]:
    import yaml  # PyYAML: a dependency of myst-parser

    path = root / ALERTS_FILE
    if not path.is_file():
        raise ExtensionError(f"bulkhead-alerts: {path} not found (the docs read it to list alerts)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def _template(text: str) -> str:
    """Prometheus templates as placeholders: ``{{ $labels.pool }}`` → ``<pool>``."""
    text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", r"<\1>", text)
    return re.sub(r"\{\{[^}]*\}\}", "…", text)


class AlertsDirective(SphinxDirective):
    """``{bulkhead-alerts}``: every rule of ``alerts.yml``, linked to its runbook section."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        root = Path(self.env.srcdir).parent
        self.env.note_dependency(str(root / ALERTS_FILE))
        body: list[list[nodes.Node]] = []
        names = []
        for rule in _alerts(root):
            name = str(rule["alert"])
            names.append(name)
            link = nodes.reference("", "", internal=True)
            link["bulkhead_alert"] = name
            link += nodes.literal(text=name)
            severity = str(rule.get("labels", {}).get("severity", ""))
            summary = _template(str(rule.get("annotations", {}).get("summary", "")))
            body.append(
                [
                    nodes.paragraph("", "", link),
                    nodes.paragraph(text=severity),
                    nodes.paragraph(text=str(rule.get("for", "0s"))),
                    nodes.paragraph(text=summary),
                ]
            )
        holder = alert_table(alerts=names)
        holder += table(["Alert", "Severity", "For", "Summary"], [30, 12, 8, 50], body)
        return [holder]


def _link_runbooks(app: Sphinx, doctree: nodes.document) -> None:
    """Point each alert at its runbook section; fail the build when one has none."""
    for holder in list(doctree.findall(alert_table)):
        sections = {
            section[0].astext().strip(): section["ids"][0]
            for section in doctree.findall(nodes.section)
            if section["ids"] and len(section) and isinstance(section[0], nodes.title)
        }
        missing = [name for name in holder["alerts"] if name not in sections]
        if missing:
            raise ExtensionError(
                f"{app.env.doc2path(app.env.docname)}: no runbook section for the alert(s) "
                f"{missing} of {ALERTS_FILE}: add a heading named after each alert"
            )
        for link in holder.findall(nodes.reference):
            if "bulkhead_alert" in link:
                link["refid"] = sections[link["bulkhead_alert"]]
                del link["bulkhead_alert"]
        holder.replace_self(holder.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("bulkhead-alerts", AlertsDirective)
    app.add_node(alert_table)
    app.connect("doctree-read", _link_runbooks)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
