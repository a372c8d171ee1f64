"""Figures of ``adaspark analyze`` and ``adaspark show`` (matplotlib, imported lazily).

``import adaspark.viz`` needs no matplotlib; each plotting function imports it on first use and
draws on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global backend switch).
Every PNG is written atomically (:func:`adaspark.core.io.atomic_path`) and has an exact pixel size:
the analysis figures have the fixed sizes of :data:`ANALYSIS_FIGURE_SIZES`, the frame figures of
``show`` the size :func:`frames_figure_size` gives for the requested width.

* :mod:`adaspark.viz.analysis` — attention sparsity per layer, per layer and head, FFN laziness,
  cube-distribution entropy and Top-p counts (all from the JSON dict of ``adaspark analyze``);
* :mod:`adaspark.viz.selection` — video frames with the kept cubes of one query as a heat map,
  frames with the tokens whose FFN was skipped, and the cube-selection timeline.
"""

from adaspark.viz.analysis import ANALYSIS_FIGURE_SIZES, plot_analysis
from adaspark.viz.figure import frames_figure_size
from adaspark.viz.selection import plot_cube_selection, plot_ffn_skips, plot_selection_timeline

__all__ = [
    "ANALYSIS_FIGURE_SIZES",
    "frames_figure_size",
    "plot_analysis",
    "plot_cube_selection",
    "plot_ffn_skips",
    "plot_selection_timeline",
]
