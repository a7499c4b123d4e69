"""Writing a phantom dataset to disk: NIfTI volumes and label maps, attributes.csv and phantoms.json.

File storage (`write_dataset`): NIfTI-1 written by `jaxldm.data.nifti.write_nifti`, with voxel axes
(i, j, k) = (W, H, D), i.e. `volume.transpose(2, 1, 0)`, and the affine of
`nifti.spacing_affine`: diag(dx, dy, dz) plus a translation that puts the FOV
centre at world (0, 0, 0). The axes already point +x, +y, +z (RAS), so a loader
that reorients to RAS does no flips and, taking the thickest axis as D, recovers
(D, H, W) exactly. Files are gzip-compressed with mtime 0, so the same arguments
give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from jaxldm.data import nifti
from jaxldm.data.errors import DataError
from jaxldm.data.phantoms.anatomy import _ANATOMY, ATTRIBUTES, DOMAIN_PARAMS
from jaxldm.data.phantoms.rendering import LABELS, _check_args, _iter_subjects

_FORMAT_VERSION = 1

_DTYPES = ("int16", "float32")
_DESCRIP = "jaxldm phantom"  # The NIfTI header description of every file written here.


def subject_id(domain: str, index: int) -> str:
  """File stem of subject `index` (0-based): e.g. "private-00001" for index 0."""
  return f"{domain}-{index + 1:05d}"


def write_dataset(out_dir: str | os.PathLike, n: int, *, domain: str = "private",
                  shape: Sequence[int] = (12, 64, 64),
                  spacing: Sequence[float] = (10.0, 1.8, 1.8), seed: int = 0,
                  phase: str = "random", dtype: str = "int16", labels: bool = True,
                  overwrite: bool = False, progress: bool = True) -> pathlib.Path:
  """Writes n phantoms as NIfTI files plus their attribute table, atomically.

  Layout: out_dir/<subject_id>.nii.gz, out_dir/labels/<subject_id>.nii.gz
  (uint8, if `labels`), out_dir/attributes.csv (`subject_id` then
  ATTRIBUTES) and out_dir/phantoms.json (arguments, DomainParams, anatomy
  constants, conventions). Everything is written into a temporary sibling
  directory that is renamed to out_dir at the end, so an interrupted call
  leaves no half-written dataset. Same arguments give byte-identical files.

  Args:
    out_dir: target directory; must not exist, be empty, or (with
      `overwrite`) hold a previous phantom dataset (it has phantoms.json):
      overwrite never deletes a directory this function did not write.
    n, domain, shape, spacing, seed, phase: as for `generate`.
    dtype: "int16" (scl_slope = max|v| / 32767, scl_inter = 0, so values
      round-trip within slope / 2) or "float32".
    labels: also write the label maps.
    overwrite: replace an existing phantom dataset at out_dir.
    progress: show a rich progress bar.

  Returns:
    The dataset directory.

  Raises:
    DataError: bad arguments, or out_dir is a file, is not empty (without
      `overwrite`) or cannot be created.
  """
  shp, sp = _check_args(n, domain, shape, spacing, seed, phase)
  if dtype not in _DTYPES:
    raise DataError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  out = pathlib.Path(out_dir)
  _check_out_dir(out, overwrite)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  except OSError as e:
    raise DataError(f"cannot create the output directory {out}: {e}") from e
  try:
    os.chmod(tmp, 0o755)
    if labels:
      (tmp / "labels").mkdir()
    rows = []
    for i, vol, row, lab in _iter_subjects(n, domain, shp, sp, int(seed), phase, labels,
                                           progress, f"writing {out.name}"):
      sid = subject_id(domain, i)
      nifti.write_nifti(tmp / f"{sid}.nii.gz", vol, sp, dtype=dtype, descrip=_DESCRIP)
      if lab is not None:
        nifti.write_nifti(tmp / "labels" / f"{sid}.nii.gz", lab, sp, dtype="uint8", descrip=_DESCRIP)
      rows.append((sid, row))
    (tmp / "attributes.csv").write_text(_attributes_csv(rows), encoding="utf-8")
    manifest = _manifest(n=n, domain=domain, shape=shp, spacing=sp, seed=int(seed),
                         phase=phase, dtype=dtype, labels=labels)
    (tmp / "phantoms.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _move_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _check_out_dir(out: pathlib.Path, overwrite: bool) -> None:
  """Refuses files, non-empty directories, and overwriting foreign directories."""
  if not out.exists() and not out.is_symlink():
    return
  if not out.is_dir():
    raise DataError(f"output path {out} exists and is not a directory")
  if not any(out.iterdir()):
    return
  if not overwrite:
    raise DataError(f"output directory {out} is not empty; choose another directory "
                    "or pass --overwrite (jaxldm data phantoms) to replace a previous phantom dataset")
  if not (out / "phantoms.json").is_file():
    raise DataError(f"refusing to overwrite {out}: it is not empty and holds no "
                    "phantoms.json, so it was not written by jaxldm data phantoms")


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Renames the finished temporary directory to `out` (replacing an old one)."""
  if out.is_dir() and not any(out.iterdir()):
    out.rmdir()
  if out.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    tmp.rename(out)


def _attributes_csv(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
  """CSV text: subject_id then ATTRIBUTES; categorical columns as integers."""
  lines = [",".join(("subject_id",) + ATTRIBUTES)]
  for sid, row in rows:
    cells = [sid] + [str(int(row[k])) if k in ("sex", "phase") else f"{row[k]:.10g}"
                     for k in ATTRIBUTES]
    lines.append(",".join(cells))
  return "\n".join(lines) + "\n"


def _manifest(**args: Any) -> dict[str, Any]:
  """Everything needed to reproduce and interpret a written dataset."""
  from jaxldm import __version__
  dp = DOMAIN_PARAMS[args["domain"]]
  return {
      "format_version": _FORMAT_VERSION,
      "generator": "jaxldm.data.phantoms",
      "jaxldm_version": __version__,
      "arguments": {**args, "spacing": [float(s) for s in args["spacing"]],
                    "shape": list(args["shape"])},
      "subject_ids": [subject_id(args["domain"], 0), subject_id(args["domain"], args["n"] - 1)],
      "attributes": list(ATTRIBUTES),
      "labels": {str(k): v for k, v in LABELS.items()},
      "domain_params": dataclasses.asdict(dp),
      "anatomy": _ANATOMY,
      "conventions": {
          "volume": "float32 (D, H, W), D = slice axis, spacing (dz, dy, dx) mm",
          "nifti_axes": "(i, j, k) = (W, H, D), i.e. volume.transpose(2, 1, 0)",
          "affine": "diag(dx, dy, dz) + translation putting the FOV centre at (0, 0, 0); "
                    "axes point +x, +y, +z (RAS): a RAS loader does no flips",
          "center_mm": "LV cavity centroid minus FOV centre, along +y (H) and +x (W)",
          "seeding": "subject i uses np.random.SeedSequence([seed, DOMAINS.index(domain), i])",
      },
  }
