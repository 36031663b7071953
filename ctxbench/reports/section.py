"""A report section: one measurement kind's part (or several kinds' shared part) of what a run
shows. Each kind names its section (ctxbench.core.kinds.Kind.report); the terminal summary
(ctxbench.reports.summary), report.html (ctxbench.reports.report) and `ctxbench report` go
through the sections of the kinds a run has, in the kinds' order, each given the results.csv
rows (strings, as ctxbench.engine.results.read_results returns them) of the kinds it covers.
"""

from __future__ import annotations

from typing import Any


class Section:
    """What a section can show; each method may show nothing (the defaults)."""

    title = ""  # report.html's heading of the section

    def terminal(self, rows: list[dict[str, Any]], console: Any) -> None:
        """Print the section's tables at the end of a run (a rich Console)."""

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        """The section as markdown, for `ctxbench report` ("" for none)."""
        return ""

    def plots(self, rows: list[dict[str, Any]], run_dir: str) -> list[str]:
        """Write the section's plots into run_dir (PNG and SVG); the paths written."""
        return []

    def html(self, rows: list[dict[str, Any]]) -> str:
        """The section's tables as HTML for report.html (its PNGs are embedded above them)."""
        return ""
