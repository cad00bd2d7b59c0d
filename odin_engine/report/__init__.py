"""The self-contained HTML audit report."""

from .report import display_scale, histogram_edges, render_report

__all__ = ["display_scale", "histogram_edges", "render_report"]
