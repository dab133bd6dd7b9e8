"""Matplotlib helpers (Agg backend, no display needed); figures are written atomically.

Conventions every figure follows: one colour per normalization (:data:`COLORS`), the
mean over seeds as a line with a ±1 std band, legends placed outside the data
(:func:`legend_below`), and axes chosen to show the effect (log steps where speed
matters, a zoomed accuracy axis where final accuracies are close).
"""

from __future__ import annotations

import io
from pathlib import Path

from .._io import atomic_write

__all__ = ["COLORS", "legend_below", "pyplot", "save_figure"]

#: colours shared by every figure so "with BN" looks the same everywhere
COLORS = {
    "bn": "tab:blue", "none": "tab:red", "renorm": "tab:green", "ghost": "tab:purple", "group": "tab:orange",
    "layer": "tab:brown", "instance": "tab:pink", "sync": "tab:cyan", "local": "tab:gray", "dropout": "tab:olive",
}


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def legend_below(fig, axes, ncol: int = 3, **kw) -> None:
    """One legend for the whole figure, below the axes (never over the data); duplicate labels merged."""
    handles, labels = [], []
    for ax in (axes if hasattr(axes, "__iter__") else [axes]):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9, **kw)


def save_figure(fig, path, bottom: float | None = None) -> str:
    """Save ``fig`` as a PNG at ``path`` (atomically), close it, and return the file name.

    ``bottom`` reserves that fraction of the height for a :func:`legend_below` legend.
    """
    buf = io.BytesIO()
    fig.tight_layout(rect=(0, bottom or 0, 1, 1))
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path).name
