"""Pictures of volumes for people: the PNG grids that trainers, `jaxldm sample` and `jaxldm evaluate` write.

matplotlib is imported inside the function: it is slow to import and only the picture writers need it.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from jaxldm.atomic import atomic_open


def save_mid_slices(volumes: np.ndarray, path: str | pathlib.Path, *, titles: list[str] | None = None,
                    columns: int = 8, suptitle: str | None = None) -> None:
  """A PNG grid of the middle slice of each (D, H, W) volume; `titles` per tile, `suptitle` above."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  volumes = np.asarray(volumes)
  n = len(volumes)
  cols = min(columns, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i, vol in enumerate(volumes):
    ax = axes.ravel()[i]
    ax.imshow(vol[vol.shape[0] // 2], cmap="gray", vmin=-1, vmax=1)
    if titles:
      ax.set_title(titles[i], fontsize=6)
  if suptitle:
    fig.suptitle(suptitle, fontsize=7)
  fig.tight_layout()
  try:
    with atomic_open(path, "wb") as f:
      fig.savefig(f, format="png", dpi=100)
  finally:
    plt.close(fig)
