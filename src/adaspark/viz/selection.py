"""Figures of ``adaspark show``: what AdaSpark selected, drawn over the video frames.

* :func:`plot_cube_selection` — frames with AdaS-Attn's cube distribution of one query (layer,
  head) as a heat map; kept cubes opaque and outlined, the other candidates faint;
* :func:`plot_ffn_skips` — frames with the tokens whose FFN was skipped (they received their cube's
  mean update) shaded;
* :func:`plot_selection_timeline` — how often the cubes of each stretch of the video were kept,
  per layer, for text and for video queries.

Inputs are NumPy arrays already in token geometry (one value per LM token of a shown frame), so the
plots know nothing of models; :mod:`adaspark.commands.show` prepares them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from adaspark.viz.figure import FramesLayout, frames_layout, new_figure, save_png

__all__ = ["TIMELINE_HEIGHT", "plot_cube_selection", "plot_ffn_skips", "plot_selection_timeline"]

#: height in pixels of the timeline figure (its width is the requested width)
TIMELINE_HEIGHT = 900
_KEPT_ALPHA = 0.6
_CANDIDATE_ALPHA = 0.18


def _check_panels(frames, grids: Sequence, titles: Sequence[str]) -> tuple[int, int, int]:
    import numpy as np

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [K, H, W, 3] RGB, got {frames.shape}")
    k = frames.shape[0]
    for g in grids:
        if g.shape[0] != k:
            raise ValueError(f"every per-token array needs {k} panels, got {g.shape}")
    if len(titles) != k:
        raise ValueError(f"{k} panels need {k} titles, got {len(titles)}")
    return k, frames.shape[1], frames.shape[2]


def _panel_axes(fig, lay: FramesLayout, i: int, frame, h_tok: int, w_tok: int, title: str):
    ax = fig.add_axes(lay.panel_rect(i))
    ax.imshow(frame, extent=(0, w_tok, h_tok, 0), interpolation="bilinear")
    ax.set_xlim(0, w_tok)
    ax.set_ylim(h_tok, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9, pad=3)
    return ax


def _cube_grid(ax, h_tok: int, w_tok: int, cube_hw: tuple[int, int]) -> None:
    ch, cw = cube_hw
    for x in range(cw, w_tok, cw):
        ax.axvline(x, color="white", lw=0.6, alpha=0.55)
    for y in range(ch, h_tok, ch):
        ax.axhline(y, color="white", lw=0.6, alpha=0.55)


def _outline(ax, cube_map, chosen, color: str, lw: float = 2.0, hatch: str | None = None) -> None:
    """Draw the bounding box of every cube in ``chosen`` (a set of ids) on its tokens of ``cube_map``."""
    import numpy as np
    from matplotlib.patches import Rectangle

    for cid in sorted(chosen):
        ys, xs = np.nonzero(cube_map == cid)
        if ys.size == 0:
            continue
        ax.add_patch(
            Rectangle(
                (xs.min(), ys.min()),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
                fill=False,
                edgecolor=color,
                lw=lw,
                hatch=hatch,
            )
        )


def _draw_marks(ax, marks) -> None:
    """Dashed boxes ``(x, y, w, h, label)`` in token units (e.g. where a needle is drawn)."""
    from matplotlib.patches import Rectangle

    for x, y, w, h, label in marks or ():
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", lw=1.6, ls="--"))
        ax.text(
            x,
            y - 0.08,
            label,
            color="white",
            fontsize=7,
            va="bottom",
            ha="left",
            bbox={"facecolor": "black", "alpha": 0.55, "pad": 1, "edgecolor": "none"},
        )


def _header(fig, lay: FramesLayout, title: str, subtitle: str) -> None:
    fig.text(0.5, lay.header_y(0), title, ha="center", va="center", fontsize=14, weight="bold")
    fig.text(0.5, lay.header_y(1), subtitle, ha="center", va="center", fontsize=10.5)


def plot_cube_selection(
    path: str | os.PathLike,
    frames,
    token_cube,
    token_prob,
    kept_cubes: set[int],
    own_cube: int,
    *,
    panel_titles: Sequence[str],
    cube_hw: tuple[int, int],
    title: str,
    subtitle: str,
    marks: Sequence | None = None,
    width: int = 1600,
) -> tuple[int, int]:
    """Frames with one query's cube distribution overlaid; returns the PNG's ``(width, height)``.

    Args:
        path: PNG to write (atomically).
        frames: ``[K, H, W, 3]`` uint8, the shown frames at the model's input resolution.
        token_cube: ``[K, h, w]`` int, the cube of every LM token of each shown frame.
        token_prob: ``[K, h, w]`` float, the query's probability of the token's cube (NaN where the
            cube is not a candidate).
        kept_cubes: cube ids the query kept; own_cube: its own cube (-1 for a text query).
        panel_titles: one title per frame; cube_hw: cube height and width in tokens (grid lines).
        title / subtitle: the header lines; width: figure width in pixels.
        marks: optional, per panel, dashed boxes ``(x, y, w, h, label)`` in token units (where a
            needle of a needle-benchmark video is).
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    k, fh, fw = _check_panels(frames, [np.asarray(token_cube), np.asarray(token_prob)], panel_titles)
    token_cube = np.asarray(token_cube)
    token_prob = np.asarray(token_prob, dtype=float)
    h_tok, w_tok = token_cube.shape[1:]
    lay = frames_layout(k, fh, fw, width)
    fig = new_figure(lay.width, lay.height)
    finite = token_prob[np.isfinite(token_prob)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if not vmax > vmin:  # a flat distribution: one colour
        vmin, vmax = 0.0, max(vmax, 1e-12)
    norm = Normalize(vmin=vmin, vmax=vmax)
    cmap = colormaps["inferno"]
    for i in range(k):
        ax = _panel_axes(fig, lay, i, frames[i], h_tok, w_tok, panel_titles[i])
        prob = token_prob[i]
        rgba = cmap(norm(np.nan_to_num(prob, nan=0.0)))
        kept = np.isin(token_cube[i], list(kept_cubes))
        rgba[..., 3] = np.where(np.isfinite(prob), np.where(kept, _KEPT_ALPHA, _CANDIDATE_ALPHA), 0.0)
        ax.imshow(rgba, extent=(0, w_tok, h_tok, 0), interpolation="nearest")
        _cube_grid(ax, h_tok, w_tok, cube_hw)
        _outline(ax, token_cube[i], set(np.unique(token_cube[i][kept]).tolist()), "cyan")
        if own_cube >= 0:
            _outline(ax, token_cube[i], {own_cube}, "lime", lw=2.5, hatch="//")
        if marks is not None:
            _draw_marks(ax, marks[i])
    _header(fig, lay, title, subtitle)
    cax = fig.add_axes(lay.footer_rect())
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    label = (
        "cube selection probability softmax(q·k̄/√d) over the candidate cubes (colour scale from the "
        "smallest to the largest) — outlined cyan, opaque: kept; faint: not kept; clear: not a candidate"
    )
    if own_cube >= 0:
        label += ", hatched green: the query's own cube (always attended)"
    cb.set_label(label, fontsize=9.5)
    save_png(fig, path)
    return lay.width, lay.height


def plot_ffn_skips(
    path: str | os.PathLike,
    frames,
    token_cube,
    token_skipped,
    *,
    panel_titles: Sequence[str],
    cube_hw: tuple[int, int],
    title: str,
    subtitle: str,
    marks: Sequence | None = None,
    width: int = 1600,
) -> tuple[int, int]:
    """Frames with the tokens whose FFN was skipped shaded; returns the PNG's ``(width, height)``.

    ``token_skipped`` ``[K, h, w]`` bool marks the skipped tokens of each shown frame; the other
    arguments are those of :func:`plot_cube_selection`.
    """
    import numpy as np
    from matplotlib.patches import Patch

    token_cube = np.asarray(token_cube)
    token_skipped = np.asarray(token_skipped, dtype=bool)
    k, fh, fw = _check_panels(frames, [token_cube, token_skipped], panel_titles)
    h_tok, w_tok = token_cube.shape[1:]
    lay = frames_layout(k, fh, fw, width)
    fig = new_figure(lay.width, lay.height)
    skip_rgb = (0.85, 0.1, 0.1)
    for i in range(k):
        ax = _panel_axes(fig, lay, i, frames[i], h_tok, w_tok, panel_titles[i])
        rgba = np.zeros((h_tok, w_tok, 4))
        rgba[..., :3] = skip_rgb
        rgba[..., 3] = np.where(token_skipped[i], 0.6, 0.0)
        ax.imshow(rgba, extent=(0, w_tok, h_tok, 0), interpolation="nearest")
        _cube_grid(ax, h_tok, w_tok, cube_hw)
        if marks is not None:
            _draw_marks(ax, marks[i])
    _header(fig, lay, title, subtitle)
    lax = fig.add_axes(lay.footer_rect())
    lax.set_axis_off()
    lax.legend(
        handles=[
            Patch(
                facecolor=(*skip_rgb, 0.6),
                edgecolor="none",
                label="FFN skipped: the token gets its cube's mean FFN update",
            ),
            Patch(facecolor="none", edgecolor="0.4", label="FFN computed (clear)"),
            Patch(facecolor="none", edgecolor="none", label="white lines: cube boundaries"),
        ],
        loc="center",
        ncol=3,
        fontsize=10,
        frameon=False,
    )
    save_png(fig, path)
    return lay.width, lay.height


def plot_selection_timeline(
    path: str | os.PathLike,
    freq_text,
    freq_video,
    slice_times: Sequence[float | None],
    *,
    dense_layers: Sequence[int] = (),
    title: str,
    width: int = 1600,
) -> tuple[int, int]:
    """Cube selection frequency over the video for every layer; returns ``(width, height)``.

    Args:
        freq_text / freq_video: ``[L, S]`` float, per layer and temporal cube slice, the fraction
            of (query, head) selections in which a candidate cube of that slice was kept (NaN where
            no selection happened), for non-video and for video queries.
        slice_times: start time in seconds of each slice (None where unknown).
        dense_layers: layers without selection (labelled).
        title: header line; width: figure width in pixels (height :data:`TIMELINE_HEIGHT`).
    """
    import numpy as np

    freq_text = np.asarray(freq_text, dtype=float)
    freq_video = np.asarray(freq_video, dtype=float)
    if freq_text.shape != freq_video.shape or freq_text.ndim != 2:
        raise ValueError(f"frequency maps must both be [L, S], got {freq_text.shape} and {freq_video.shape}")
    n_l, n_s = freq_text.shape
    fig = new_figure(width, TIMELINE_HEIGHT)
    gs = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.75], width_ratios=[1, 0.015], hspace=0.42, wspace=0.02)
    axes = [fig.add_subplot(gs[r, 0]) for r in range(3)]
    cax = fig.add_subplot(gs[0:2, 1])
    im = None
    for ax, m, label in ((axes[0], freq_text, "text queries"), (axes[1], freq_video, "video queries")):
        im = ax.imshow(
            m,
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            origin="lower",
            interpolation="nearest",
            extent=(-0.5, n_s - 0.5, -0.5, n_l - 0.5),
        )
        ax.set_ylabel("decoder layer")
        ax.set_title(f"{label}: how often the cubes of each time slice were kept", fontsize=11)
        if n_l <= 40:
            ax.set_yticks(range(n_l))
        for li in dense_layers:
            ax.text(
                n_s / 2 - 0.5,
                li,
                "dense layer (no selection)",
                ha="center",
                va="center",
                fontsize=8,
                color="0.3",
            )
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("selection frequency (kept / candidate)")
    x = np.arange(n_s)
    for m, label, col in (
        (freq_text, "text queries", "tab:orange"),
        (freq_video, "video queries", "tab:blue"),
    ):
        with np.errstate(invalid="ignore"):
            counts = np.isfinite(m).sum(0)
            mean = np.where(counts > 0, np.nansum(m, 0) / np.maximum(counts, 1), np.nan)
        axes[2].plot(x, mean, "o-", color=col, label=label, markersize=3)
    axes[2].set_ylabel("mean over layers")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_xlim(-0.5, n_s - 0.5)
    axes[2].grid(True, alpha=0.3)
    axes[2].legend(fontsize=9, loc="upper right")
    step = max(1, int(np.ceil(n_s / 14)))
    ticks = list(range(0, n_s, step))
    labels = [f"{slice_times[t]:.1f}" if slice_times[t] is not None else str(t) for t in ticks]
    known = all(slice_times[t] is not None for t in ticks)
    for ax in axes:
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
    axes[2].set_xlabel("video time at the start of each cube slice (s)" if known else "cube time slice")
    fig.suptitle(title, fontsize=13)
    fig.subplots_adjust(left=0.06, right=0.93, top=0.92, bottom=0.07)
    save_png(fig, path)
    return width, TIMELINE_HEIGHT
