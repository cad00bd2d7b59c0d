"""The self-contained HTML audit report."""

from .report import counts_from_quantiles, display_scale, histogram_edges, render_report

__all__ = ["counts_from_quantiles", "display_scale", "histogram_edges", "render_report"]
