"""Figures of ``adaspark analyze``, drawn from its JSON result (so they can be redrawn from the file).

* ``attention_sparsity.png`` — per layer, the fraction of causal keys (top) and of visible cubes
  (bottom) that hold 90 / 95 / 99 % of a query's attention mass, for video queries (left) and text
  queries (right): mean as a line, 10th–90th percentile as a band;
* ``attention_heads.png`` — the same key fraction (first threshold) per layer and head;
* ``ffn_laziness.png`` — ``||FFN(x)|| / ||x||`` per layer, video vs text tokens: mean ± std and the
  variance;
* ``cube_entropy.png`` — entropy of AdaS-Attn's cube distribution per layer (with the entropy of a
  flat distribution over the same candidates), the fraction of candidate cubes Top-p keeps at each
  ``p``, and the fraction of video tokens AdaS-FFN keeps at each ``p``.
"""

from __future__ import annotations

import os
from pathlib import Path

from adaspark.viz.figure import new_figure, save_png

__all__ = ["ANALYSIS_FIGURE_SIZES", "plot_analysis"]

#: file stem -> (width, height) in pixels
ANALYSIS_FIGURE_SIZES: dict[str, tuple[int, int]] = {
    "attention_sparsity": (1600, 1000),
    "attention_heads": (1600, 800),
    "ffn_laziness": (1600, 700),
    "cube_entropy": (1800, 650),
}

_KINDS = (("video_queries", "video queries"), ("text_queries", "text queries"))
_TOKEN_KINDS = (("video", "video tokens", "tab:blue"), ("text", "text tokens", "tab:orange"))


def _key(x: float) -> str:
    return f"{x:g}"


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


def _get(d: dict | None, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _series(result: dict, *path, stat: str = "mean") -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for lay in result["layers"]:
        v = _get(lay, *path, stat)
        if v is not None:
            xs.append(lay["index"])
            ys.append(float(v))
    return xs, ys


def _layer_axis(ax, n_layers: int) -> None:
    ax.set_xlabel("decoder layer")
    if n_layers <= 40:
        ax.set_xticks(range(n_layers))
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.grid(True, alpha=0.3)


def _fraction_axis(ax) -> None:
    """Percent y axis; logarithmic when the plotted values span more than a factor of 20."""
    from matplotlib.ticker import FuncFormatter

    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if ys and min(ys) < max(ys) / 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{100 * y:.3g}%"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _pos: ""))


def _plot_sparsity(result: dict, path: Path) -> None:
    w, h = ANALYSIS_FIGURE_SIZES["attention_sparsity"]
    fig = new_figure(w, h)
    n_layers = len(result["layers"])
    ths = result["thresholds"]
    axes = fig.subplots(2, 2, sharex=True)
    colors = ["tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown"]
    rows = (("keys_fraction", "fraction of causal keys"), ("cubes_fraction", "fraction of visible cubes"))
    for r, (stat, ylabel) in enumerate(rows):
        for c, (kind, kind_label) in enumerate(_KINDS):
            ax = axes[r][c]
            drawn = False
            for i, t in enumerate(ths):
                col = colors[i % len(colors)]
                xs, mean = _series(result, "attention", kind, _key(t), stat)
                if not xs:
                    continue
                _, lo = _series(result, "attention", kind, _key(t), stat, stat="p10")
                _, hi = _series(result, "attention", kind, _key(t), stat, stat="p90")
                ax.plot(xs, mean, "o-", color=col, label=f"{_pct(t)} of the mass (mean)")
                ax.fill_between(xs, lo, hi, color=col, alpha=0.15)
                drawn = True
            q = _get(result, "queries", "video" if kind == "video_queries" else "text", default=0)
            what = "keys" if r == 0 else "cubes (mass on video keys, renormalised)"
            ax.set_title(f"{kind_label} ({q}): {what}", fontsize=11)
            ax.set_ylabel(ylabel)
            _layer_axis(ax, n_layers)
            if drawn:
                _fraction_axis(ax)
                ax.legend(fontsize=9, loc="best", title="band: 10th–90th percentile", title_fontsize=8)
            else:
                ax.text(0.5, 0.5, "no such queries", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(
        "Attention sparsity of the dense model: the share of the context that holds "
        f"{' / '.join(_pct(t) for t in ths)} of each query's attention mass",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    save_png(fig, path)


def _plot_heads(result: dict, path: Path) -> None:
    import numpy as np

    w, h = ANALYSIS_FIGURE_SIZES["attention_heads"]
    fig = new_figure(w, h)
    t = result["thresholds"][0]
    mats = []
    for kind, _ in _KINDS:
        rows = []
        for lay in result["layers"]:
            v = _get(lay, "attention", kind, _key(t), "keys_fraction_per_head")
            rows.append(v)
        width = max((len(r) for r in rows if r), default=0)
        mats.append(np.array([r if r else [np.nan] * width for r in rows], dtype=float) if width else None)
    finite = [m[np.isfinite(m)] for m in mats if m is not None]
    vmax = max((float(f.max()) for f in finite if f.size), default=1.0)
    axes = fig.subplots(1, 2)
    im = None
    for ax, m, (kind, label) in zip(axes, mats, _KINDS, strict=True):
        if m is None:
            ax.text(0.5, 0.5, f"no {label}", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, origin="lower")
        n_l, n_h = m.shape
        ax.set_xlabel("query head")
        ax.set_ylabel("decoder layer")
        if n_h <= 40:
            ax.set_xticks(range(n_h))
        if n_l <= 40:
            ax.set_yticks(range(n_l))
        q = _get(result, "queries", "video" if kind == "video_queries" else "text", default=0)
        ax.set_title(f"{label} ({q})", fontsize=11)
        if n_l * n_h <= 160:
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if v < 0.6 * vmax else "black",
                    )
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes), shrink=0.9, pad=0.02)
        cb.set_label(f"mean fraction of causal keys holding {_pct(t)} of the mass")
    fig.suptitle(
        f"Attention sparsity per layer and head: mean fraction of causal keys that hold {_pct(t)} of "
        "a query's attention mass (lower = sparser)",
        fontsize=13,
    )
    save_png(fig, path)


def _plot_ffn(result: dict, path: Path) -> None:
    w, h = ANALYSIS_FIGURE_SIZES["ffn_laziness"]
    fig = new_figure(w, h)
    n_layers = len(result["layers"])
    ax_m, ax_v = fig.subplots(1, 2)
    for i, (kind, label, col) in enumerate(_TOKEN_KINDS):
        xs, mean = _series(result, "ffn", kind)
        if not xs:
            continue
        _, std = _series(result, "ffn", kind, stat="std")
        _, var = _series(result, "ffn", kind, stat="var")
        count = _get(result["layers"][0], "ffn", kind, "count", default=0)
        off = (i - 0.5) * 0.12  # side by side
        ax_m.errorbar(
            [x + off for x in xs], mean, yerr=std, fmt="o-", color=col, capsize=4, label=f"{label} ({count})"
        )
        ax_v.plot(xs, var, "o-", color=col, label=label)
    ax_m.set_ylabel("||FFN(x)|| / ||x||  (mean ± std)")
    ax_m.set_title("mean ratio of the FFN update to its input, per token", fontsize=11)
    ax_v.set_ylabel("variance of ||FFN(x)|| / ||x||")
    ax_v.set_title("variance across tokens (log scale)", fontsize=11)
    ax_v.set_yscale("log")
    for ax in (ax_m, ax_v):
        _layer_axis(ax, n_layers)
        ax.legend(fontsize=9)
    fig.suptitle(
        "FFN laziness: x = residual stream entering the FFN sub-layer, FFN(x) = MLP(RMSNorm(x))",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    save_png(fig, path)


def _plot_entropy(result: dict, path: Path) -> None:
    w, h = ANALYSIS_FIGURE_SIZES["cube_entropy"]
    fig = new_figure(w, h)
    n_layers = len(result["layers"])
    ps = result["p_values"]
    ax_e, ax_k, ax_f = fig.subplots(1, 3)
    styles = {"video_queries": "--", "text_queries": "-"}
    cols = {"video_queries": "tab:blue", "text_queries": "tab:orange"}
    for kind, label in _KINDS:
        xs, ent = _series(result, "attention", kind, "entropy")
        if not xs:
            continue
        _, mx = _series(result, "attention", kind, "max_entropy")
        ax_e.plot(xs, ent, "o" + styles[kind], color=cols[kind], label=f"{label}")
        ax_e.plot(xs, mx, ":", color=cols[kind], alpha=0.7, label=f"{label}: flat distribution")
    ax_e.set_ylabel("entropy (nats)")
    ax_e.set_title("entropy of softmax(q·k̄/√d) over candidate cubes", fontsize=11)
    cmap = ["tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:brown", "tab:gray"]
    for i, p in enumerate(ps):
        col = cmap[i % len(cmap)]
        for kind, _label in _KINDS:
            xs, kept = _series(result, "attention", kind, "cubes_kept_fraction", _key(p))
            if xs:
                lab = (
                    f"p = {p:g}"
                    if kind == "text_queries"
                    or not _series(result, "attention", "text_queries", "cubes_kept_fraction", _key(p))[0]
                    else None
                )
                ax_k.plot(xs, kept, "o" + styles[kind], color=col, label=lab, markersize=4)
        xs, fk = [], []
        for lay in result["layers"]:
            v = _get(lay, "ffn_tokens_kept", _key(p))
            if v is not None:
                xs.append(lay["index"])
                fk.append(float(v))
        if xs:
            ax_f.plot(xs, fk, "o-", color=col, label=f"p = {p:g}", markersize=4)
    ax_k.set_ylabel("fraction of candidate cubes kept")
    ax_k.set_title("AdaS-Attn: cubes Top-p keeps (solid: text, dashed: video queries)", fontsize=11)
    ax_f.set_ylabel("fraction of video tokens through the FFN")
    ax_f.set_title("AdaS-FFN: tokens Top-p keeps per cube", fontsize=11)
    for ax in (ax_e, ax_k, ax_f):
        _layer_axis(ax, n_layers)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in (ax_k, ax_f):
        ax.set_ylim(0, 1.05)
    fig.suptitle("Cube distributions: entropy and what Top-p keeps at each threshold p", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_png(fig, path)


def plot_analysis(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw the four analysis figures from ``result`` (the dict ``adaspark analyze`` writes) into
    ``out_dir``; returns ``{stem: path}`` (sizes in :data:`ANALYSIS_FIGURE_SIZES`)."""
    out = Path(out_dir)
    if not result.get("layers"):
        raise ValueError("the analysis result has no layers to plot")
    paths = {}
    for stem, fn in (
        ("attention_sparsity", _plot_sparsity),
        ("attention_heads", _plot_heads),
        ("ffn_laziness", _plot_ffn),
        ("cube_entropy", _plot_entropy),
    ):
        p = out / f"{stem}.png"
        fn(result, p)
        paths[stem] = p
    return paths
