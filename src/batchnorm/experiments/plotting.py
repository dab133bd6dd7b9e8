"""Matplotlib helpers (Agg backend, no display needed); figures are written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from .report import atomic_write

__all__ = ["ARM_STYLE", "pyplot", "save_figure"]

#: colours shared by every figure so "with BN" looks the same everywhere
ARM_STYLE = {
    "bn": {"color": "tab:blue", "label": "with BN"},
    "none": {"color": "tab:red", "label": "without BN"},
    "renorm": {"color": "tab:green", "label": "batch renorm"},
    "ghost": {"color": "tab:purple", "label": "ghost BN"},
    "group": {"color": "tab:orange", "label": "group norm"},
}


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> str:
    """Save ``fig`` as a PNG at ``path`` (atomically), close it, and return the file name."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path).name
