"""Accuracy-against-compression plots (needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from .formats import FORMATS

__all__ = ["plot_accuracy_vs_compression"]

_COLOURS = {"dense": "black", "tucker": "tab:green", "tt": "tab:blue", "tr": "tab:red", "cp": "tab:orange"}
_FAMILY = {"dense": "dense", **{name: cls.family for name, (cls, _) in FORMATS.items()}}


def plot_accuracy_vs_compression(points: Iterable[Mapping], path: str | Path, title: str = "") -> Path:
    """Write a PNG: test accuracy against compression factor (log x axis).

    Each point is a mapping with 'format', 'compression' and 'accuracy' (a fraction), and
    optionally 'label' and 'error' (a spread to draw as an error bar). Each format family has
    one colour; semi-tensor formats are filled markers, classic formats hollow.

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install stpnet[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'stpnet[plot]'") from exc
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    seen = set()
    for p in points:
        fmt = p["format"]
        family = _FAMILY.get(fmt, fmt)
        colour = _COLOURS.get(family, "tab:purple")
        semi = fmt in FORMATS and FORMATS[fmt][1]
        label = fmt if fmt not in seen else None
        seen.add(fmt)
        ax.errorbar(p["compression"], 100 * p["accuracy"], yerr=100 * p.get("error", 0) or None, fmt="o",
                    color=colour, markerfacecolor=colour if (semi or fmt == "dense") else "white",
                    markersize=8, capsize=3, label=label)
        if p.get("label"):
            ax.annotate(p["label"], (p["compression"], 100 * p["accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("compression factor (whole model, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
