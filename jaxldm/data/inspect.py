"""`jaxldm data inspect DIR`: what is in a NIfTI directory, before anything is trained on it.

Lenient on purpose: a bad file or CSV row is listed as a problem instead of stopping the scan, so
one run shows everything to fix. The CLI exits non-zero when there are problems.

It reads files and the attribute CSV with the loader's own rules (`jaxldm.data.dataset`: which
files are volumes, subject ids with or without `.nii`/`.nii.gz`, missing-value markers, numbers),
so what it reports as a problem is what `jaxldm data prepare` and training refuse. Text-only
columns are reported as categorical with the `data.categories` override they need.
"""

from __future__ import annotations

import collections
import csv
import pathlib
from typing import Any

import nibabel as nib
import numpy as np

from jaxldm.data import dataset, nifti
from jaxldm.data.dataset import MISSING_VALUES
from jaxldm.data.errors import DataError

SPARK = "▁▂▃▄▅▆▇█"


def _file_summary(path: pathlib.Path) -> dict[str, Any]:
  """Header facts plus raw intensity statistics (scaled values, before any preprocessing)."""
  try:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
  except Exception as e:  # Unreadable files are reported, not fatal, in an inspection.
    raise DataError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from e
  if data.ndim not in (3, 4):
    raise DataError(f"{path} has {data.ndim} dimensions {data.shape}; expected a 3D volume or 4D cine")
  # Validates the raw header's spacing too (nibabel silently "fixes" zero/negative pixdim).
  canonical_shape, canonical_spacing = nifti.canonical_layout(img)
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  finite = np.isfinite(data)
  n_bad = int(data.size - finite.sum())
  if n_bad:
    raise DataError(f"{path} has {n_bad} NaN/Inf voxels")
  lo, p1, p99, hi = (float(v) for v in np.percentile(data, [0, 1, 99, 100]))
  if hi == lo:
    raise DataError(f"{path} is constant (value {lo:g}); it carries no image")
  summary = {
      "file": path.name,
      "shape": list(data.shape),
      "spacing": list(zooms),
      "axcodes": "".join(nib.aff2axcodes(img.affine)),
      "dtype": str(img.get_data_dtype()),
      "nifti": 2 if isinstance(img, nib.Nifti2Image) else 1,
      "frames": int(data.shape[3]) if data.ndim == 4 else 1,
      "min": lo, "p1": p1, "p99": p99, "max": hi,
  }
  # The (D, H, W) order the loader will produce: D is the thickest axis after reorientation.
  summary["canonical_shape"], summary["canonical_spacing"] = list(canonical_shape), list(canonical_spacing)
  return summary


def _histogram(values: np.ndarray, bins: int = 12) -> str:
  if values.size == 0:
    return ""
  counts, _ = np.histogram(values, bins=bins)
  top = counts.max()
  return "".join(SPARK[min(len(SPARK) - 1, int(round(c / top * (len(SPARK) - 1))))] if c else " " for c in counts)


def _is_number(cell: str) -> bool:
  try:
    float(cell)
  except ValueError:
    return False
  return True


def _text_categories(header: list[str], id_col: int, rows, columns: list[str]) -> dict[str, tuple[str, ...]]:
  """Columns whose every present cell is text: their sorted values, as `data.categories` would name them."""
  out = {}
  for column in columns:
    j = header.index(column)
    present = [r[j].strip() for _, r in rows if j < len(r) and r[j].strip().lower() not in MISSING_VALUES]
    if present and not any(_is_number(v) for v in present):
      out[column] = tuple(sorted(set(present)))
  return out


def _column_stats(values: np.ndarray, mask: np.ndarray, names: tuple[str, ...] | None) -> dict[str, Any]:
  present = values[mask > 0].astype(np.float64)
  coverage = float(mask.mean()) if mask.size else 0.0
  if names is not None:
    counts = collections.Counter(names[int(v)] for v in present)
    return {"kind": "categorical", "coverage": coverage, "counts": dict(counts.most_common(8)),
            "text": True, "categories": list(names)}
  if present.size == 0:
    return {"kind": "continuous", "coverage": coverage, "mean": float("nan"), "std": float("nan"),
            "min": float("nan"), "max": float("nan"), "histogram": ""}
  distinct = np.unique(present)
  if distinct.size <= 5 and np.all(distinct == np.round(distinct)):
    counts = collections.Counter(present.astype(int).tolist())
    return {"kind": "categorical", "coverage": coverage, "counts": {str(k): v for k, v in sorted(counts.items())}}
  return {
      "kind": "continuous", "coverage": coverage,
      "mean": float(present.mean()), "std": float(present.std()),
      "min": float(present.min()), "max": float(present.max()),
      "histogram": _histogram(present),
  }


def _listing(items: list[str]) -> str:
  return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")


def _attribute_report(csv_path: pathlib.Path, volume_ids: list[str]) -> tuple[dict[str, Any], list[str], list[str]]:
  """(report, problems, hints): the CSV parsed by the loader's rules, every bad row and cell listed."""
  problems: list[str] = []
  header, id_col, table = dataset.read_table(csv_path)
  columns = [h for i, h in enumerate(header) if i != id_col]
  categories = _text_categories(header, id_col, table, columns)
  rows = dataset.parse_rows(str(csv_path), header, id_col, table, columns, categories, problems=problems)
  ids = [row_id for row_id, _, _ in rows]
  duplicates = sorted(k for k, v in collections.Counter(ids).items() if v > 1)
  unknown = sorted(set(ids) - set(volume_ids))
  without_row = sorted(set(volume_ids) - set(ids))
  if duplicates:
    problems.append(f"{csv_path}: duplicate subject ids: {_listing(duplicates)}")
  if unknown:
    problems.append(f"{csv_path}: {len(unknown)} subject id(s) with no volume: {_listing(unknown)} "
                    "(training refuses them unless --config.data.strict_ids=false)")
  if without_row:
    problems.append(f"{csv_path}: {len(without_row)} volume(s) with no CSV row: {_listing(without_row)} "
                    "(training refuses them unless --config.data.strict_ids=false)")
  values = np.array([v for _, v, _ in rows], np.float32).reshape(len(rows), len(columns))
  mask = np.array([m for _, _, m in rows], np.float32).reshape(len(rows), len(columns))
  report = {
      "csv": str(csv_path), "rows": len(table),
      "columns": {c: _column_stats(values[:, j], mask[:, j], categories.get(c)) for j, c in enumerate(columns)},
  }
  hints = [f"column {c!r} is text; to condition on it, add '--config.data.categories={c}={'|'.join(names)}'"
           for c, names in categories.items()]
  return report, problems, hints


def _range(values: list[float]) -> dict[str, float]:
  arr = np.asarray(values, dtype=np.float64)
  return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}


def inspect_directory(root: str | pathlib.Path, *, csv_path: str | pathlib.Path | None = None,
                      progress: bool = False) -> dict[str, Any]:
  """Summarises a NIfTI directory: counts, shapes, spacings, orientations, intensities, attributes.

  Raises DataError only when there is nothing to inspect (missing or empty directory); per-file and
  per-row problems are collected in `report["problems"]`.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DataError(f"{root} is not a directory (expected a directory of .nii/.nii.gz volumes)")
  paths = sorted(p for p in root.iterdir() if dataset.is_volume_file(p))  # The loader's rule.
  if not paths:
    raise DataError(f"{root} contains no .nii or .nii.gz files")
  files, problems = [], []
  iterator = paths
  if progress:
    from rich.progress import track
    iterator = track(paths, description=f"reading {root}", transient=True)
  for path in iterator:
    try:
      files.append(_file_summary(path))
    except DataError as e:
      problems.append(str(e))
  subject_ids = [nifti.subject_id(p) for p in paths]
  several = sorted(k for k, v in collections.Counter(subject_ids).items() if v > 1)
  if several:
    problems.append(f"{root}: several files for subject(s) {_listing(several)} (e.g. both .nii and .nii.gz); keep one")
  hints: list[str] = []
  report: dict[str, Any] = {"root": str(root), "files": len(paths), "readable": len(files), "problems": problems,
                            "hints": hints}
  if files:
    report["shapes"] = dict(collections.Counter("x".join(map(str, f["shape"])) for f in files).most_common())
    if all("canonical_shape" in f for f in files):
      report["canonical_shapes"] = dict(collections.Counter("x".join(map(str, f["canonical_shape"])) for f in files).most_common())
    report["spacing"] = [_range([f["spacing"][a] for f in files]) for a in range(3)]
    report["orientations"] = dict(collections.Counter(f["axcodes"] for f in files).most_common())
    report["dtypes"] = dict(collections.Counter(f["dtype"] for f in files).most_common())
    report["nifti_versions"] = dict(collections.Counter(f"NIfTI-{f['nifti']}" for f in files).most_common())
    report["frames"] = dict(collections.Counter(str(f["frames"]) for f in files).most_common())
    report["intensity"] = {k: _range([f[k] for f in files]) for k in ("min", "p1", "p99", "max")}
  if csv_path is None and (root / "attributes.csv").is_file():
    csv_path = root / "attributes.csv"
  if csv_path is not None:
    try:
      report["attributes"], csv_problems, csv_hints = _attribute_report(pathlib.Path(csv_path), subject_ids)
      problems.extend(csv_problems)
      hints.extend(csv_hints)
    except DataError as e:
      problems.append(str(e))
  return report


def _fmt(x: float) -> str:
  return f"{x:.4g}"


def render(report: dict[str, Any], console=None) -> None:
  """Prints an inspection report as rich tables."""
  from rich.console import Console
  from rich.table import Table

  console = console or Console()
  console.print(f"[bold]{report['root']}[/]: {report['files']} NIfTI file(s), {report['readable']} readable", soft_wrap=True)
  if report.get("shapes"):
    t = Table(title="volumes", show_header=True, header_style="bold")
    t.add_column("property")
    t.add_column("values (count)")
    t.add_row("shape (file voxel axes)", ", ".join(f"{k} ({v})" for k, v in report["shapes"].items()))
    if "canonical_shapes" in report:
      t.add_row("shape as loaded (D,H,W)", ", ".join(f"{k} ({v})" for k, v in report["canonical_shapes"].items()))
    for axis, s in zip("ijk", report["spacing"]):
      t.add_row(f"spacing {axis} (mm)", f"min {_fmt(s['min'])}  median {_fmt(s['median'])}  max {_fmt(s['max'])}")
    t.add_row("orientation", ", ".join(f"{k} ({v})" for k, v in report["orientations"].items()))
    t.add_row("dtype", ", ".join(f"{k} ({v})" for k, v in report["dtypes"].items()))
    t.add_row("format", ", ".join(f"{k} ({v})" for k, v in report["nifti_versions"].items()))
    t.add_row("frames", ", ".join(f"{k} ({v})" for k, v in report["frames"].items()))
    for k, s in report["intensity"].items():
      t.add_row(f"intensity {k}", f"min {_fmt(s['min'])}  median {_fmt(s['median'])}  max {_fmt(s['max'])}")
    console.print(t)
  attrs = report.get("attributes")
  if attrs:
    t = Table(title=f"attributes: {attrs['csv']} ({attrs['rows']} rows)", header_style="bold")
    t.add_column("column", no_wrap=True)
    for col in ("coverage", "mean ± std", "range", "distribution"):
      t.add_column(col)
    for name, s in attrs["columns"].items():
      if s["kind"] == "continuous":
        t.add_row(name, f"{s['coverage']:.0%}", f"{_fmt(s['mean'])} ± {_fmt(s['std'])}",
                  f"{_fmt(s['min'])} .. {_fmt(s['max'])}", s["histogram"])
      else:
        t.add_row(name, f"{s['coverage']:.0%}", "", "", "  ".join(f"{k}: {v}" for k, v in s["counts"].items()))
    console.print(t)
  for h in report.get("hints", ()):
    console.print(f"[yellow]note[/]: {h}", highlight=False, soft_wrap=True)
  for p in report["problems"]:
    console.print(f"[red]problem[/]: {p}", highlight=False, soft_wrap=True)
  if report["problems"]:
    console.print(f"[red]{len(report['problems'])} problem(s) found[/]")
