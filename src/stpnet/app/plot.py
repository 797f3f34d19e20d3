"""Accuracy plots: against compression, and by recovery stage (need matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from .._atomic import atomic_path
from ..formats import FORMATS

__all__ = ["plot_accuracy_vs_compression", "plot_recovery_stages"]

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
    plt = _pyplot()
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
    return _save(fig, ax, path, title)


def plot_recovery_stages(networks: Iterable[Mapping], stages: Mapping[str, str], path: str | Path,
                         dense_accuracy: float | None = None, title: str = "") -> Path:
    """Write a PNG: each compressed network's test accuracy at each recovery stage, as grouped bars.

    Parameters
    ----------
    networks : iterable of mappings
        One per compressed network: 'format', 'compression', 'params' and, for each key of
        ``stages``, an accuracy (a fraction, or None where the stage was not run).
    stages : mapping of str to str
        Keys of ``networks`` to draw, in order, with the legend text of each (e.g.
        ``{'plain': 'straight after compression', 'accuracy': 'after fine-tuning'}``).
    dense_accuracy : float, optional
        Drawn as a dashed line across the bars.

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install stpnet[plot]``).
    """
    plt = _pyplot()
    networks = list(networks)
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    width = 0.8 / max(len(stages), 1)
    shades = plt.get_cmap("Blues")
    for i, (key, text) in enumerate(stages.items()):
        xs = [n + (i - (len(stages) - 1) / 2) * width for n in range(len(networks))]
        values = [100 * (net.get(key) or 0.0) for net in networks]
        bars = ax.bar(xs, values, width, label=text, color=shades(0.35 + 0.55 * i / max(len(stages) - 1, 1)))
        ax.bar_label(bars, labels=[f"{v:.0f}" if net.get(key) is not None else "" for v, net in zip(values, networks)],
                     fontsize=7, padding=2)
    if dense_accuracy is not None:
        ax.axhline(100 * dense_accuracy, color="black", linestyle="--", linewidth=1,
                   label=f"dense {100 * dense_accuracy:.1f}%")
    ax.set_xticks(range(len(networks)))
    ax.set_xticklabels([f"{net['format']}\n{net['compression']:.1f}x, {net['params']:,} params" for net in networks],
                       fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 120)  # room for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    return _save(fig, ax, path, title)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'stpnet[plot]'") from exc
    return plt


def _save(fig, ax, path: str | Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, "plot") as partial:  # a failed or interrupted write keeps the old plot
            fig.savefig(partial, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
