"""Seaborn figures, saved to figures/ through one helper."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from deepen import REPO

sns.set_theme(style="whitegrid", context="notebook")


def figures_dir() -> Path:
    """$DEEPEN_FIGURES, else the repository's figures/ folder (else ./figures)."""
    if os.environ.get("DEEPEN_FIGURES"):
        return Path(os.environ["DEEPEN_FIGURES"])
    return REPO / "figures" if (REPO / "pyproject.toml").is_file() else Path("figures")


def save(fig: plt.Figure, name: str, folder: str | Path | None = None) -> Path:
    """Write `fig` as figures/<name>.png (or <folder>/<name>.png), atomically, and return the path."""
    out = Path(folder) if folder is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path
