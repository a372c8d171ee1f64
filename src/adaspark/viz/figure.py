"""Figure plumbing shared by the plots: lazy matplotlib, exact pixel sizes, atomic PNG writes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FramesLayout", "frames_figure_size", "frames_layout", "new_figure", "save_png"]

#: resolution of every figure (pixel sizes are exact: figure inches × DPI)
DPI = 100
#: frame panels per row of the frame figures
MAX_COLUMNS = 4
# fixed bands of the frame figures, in pixels
_HEADER = 96  # two title lines
_PANEL_TITLE = 26
_GAP = 10
_MARGIN = 16
_FOOTER = 86  # colour bar or legend with its label


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"the figures need matplotlib: pip install 'adaspark[viz]' ({e})") from None
    return Figure, FigureCanvasAgg


def new_figure(width: int, height: int):
    """A matplotlib ``Figure`` of exactly ``width × height`` pixels on an Agg canvas."""
    if width < 64 or height < 64:
        raise ValueError(f"figure size must be at least 64×64 pixels, got {width}×{height}")
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=(width / DPI, height / DPI), dpi=DPI)
    canvas_cls(fig)
    fig.patch.set_facecolor("white")
    return fig


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically; returns the path."""
    from adaspark.core.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


@dataclass(frozen=True)
class FramesLayout:
    """Pixel geometry of a frame figure: ``rows × cols`` panels of ``panel_w × panel_h``."""

    width: int
    height: int
    rows: int
    cols: int
    panel_w: float
    panel_h: float

    def panel_rect(self, i: int) -> list[float]:
        """``[left, bottom, width, height]`` of panel ``i`` in figure fractions."""
        r, c = divmod(i, self.cols)
        left = _MARGIN + c * (self.panel_w + _GAP)
        top = _HEADER + r * (self.panel_h + _PANEL_TITLE + _GAP) + _PANEL_TITLE
        bottom = self.height - top - self.panel_h
        return [
            left / self.width,
            bottom / self.height,
            self.panel_w / self.width,
            self.panel_h / self.height,
        ]

    def footer_rect(self) -> list[float]:
        """``[left, bottom, width, height]`` of the colour-bar / legend strip."""
        w = min(self.width - 2 * _MARGIN, 900)
        left = (self.width - w) / 2
        return [left / self.width, 46 / self.height, w / self.width, 16 / self.height]

    def header_y(self, line: int) -> float:
        """Figure-fraction y of header text line 0 or 1."""
        return 1 - (28 + 32 * line) / self.height


def frames_layout(num_panels: int, frame_height: int, frame_width: int, width: int) -> FramesLayout:
    """Geometry of a figure of ``num_panels`` frames (each ``frame_height × frame_width`` px) that is
    ``width`` pixels wide: up to :data:`MAX_COLUMNS` panels per row, panels keep the frame's aspect,
    a header for two title lines, a title above each panel and a footer for the colour bar."""
    if num_panels < 1:
        raise ValueError("a frame figure needs at least one panel")
    if frame_height < 1 or frame_width < 1:
        raise ValueError(f"frame size must be positive, got {frame_height}×{frame_width}")
    cols = min(num_panels, MAX_COLUMNS)
    rows = math.ceil(num_panels / cols)
    panel_w = (width - 2 * _MARGIN - (cols - 1) * _GAP) / cols
    if panel_w < 32:
        raise ValueError(f"--width {width} is too small for {cols} frame panels per row")
    panel_h = panel_w * frame_height / frame_width
    height = round(_HEADER + rows * (_PANEL_TITLE + panel_h) + (rows - 1) * _GAP + _FOOTER)
    return FramesLayout(width=width, height=height, rows=rows, cols=cols, panel_w=panel_w, panel_h=panel_h)


def frames_figure_size(num_panels: int, frame_height: int, frame_width: int, width: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a frame figure (see :func:`frames_layout`)."""
    lay = frames_layout(num_panels, frame_height, frame_width, width)
    return lay.width, lay.height
