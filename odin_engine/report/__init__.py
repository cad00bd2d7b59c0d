"""The self-contained HTML audit report."""

from .report import render_report, write_report

__all__ = ["render_report", "write_report"]
