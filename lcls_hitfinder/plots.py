"""Shared plotting helpers (matplotlib, headless): grids of diffraction patterns with titles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pattern_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    titles: Sequence[str],
    out_png: Path | str,
    ncols: int = 6,
    log: bool = True,
    panel_inches: float = 2.2,
    suptitle: str | None = None,
) -> Path:
    """Save images (each (H, W), photons) in a grid with one title each, to `out_png`.

    Log scale shows log10(1 + value), so zero-photon pixels stay black and one photon is visible,
    each panel scaled to its own range (a blank is not washed out by a bright neighbour).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    n = max(1, len(images))
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_inches * ncols, panel_inches * nrows + (0.4 if suptitle else 0)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), images, titles, strict=False):
        data = np.log10(1 + np.clip(image, 0, None)) if log else np.asarray(image)
        ax.imshow(data, cmap="magma", origin="lower", interpolation="nearest", vmin=0 if log else None)
        ax.set_title(title, fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
