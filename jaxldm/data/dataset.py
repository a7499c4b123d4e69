"""A directory of NIfTI volumes with optional per-subject attributes, cached.

Decoding and resampling NIfTI files dominates the cost of an epoch on small
3D models, so every preprocessed volume is cached as a `.npy` file keyed by
the preprocessing parameters and by the source file's identity (path, size,
mtime): later epochs and later runs read no NIfTI at all, and an edited file
or a changed parameter is never served stale.

Attributes (age, sex, diagnosis...) come from a CSV with one row per subject;
missing values are carried as a mask instead of being imputed, so models can
learn to condition on whatever is known.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxldm.data import nifti
from jaxldm.data.errors import DataError

# Bump whenever preprocessing code changes its output, to invalidate caches.
CACHE_VERSION = 1
CACHE_DIRNAME = ".jaxldm_cache"
ATTRIBUTES_FILENAME = "attributes.csv"
ID_COLUMNS = ("subject_id", "id", "subject")
MISSING_VALUES = frozenset({"", "na", "nan", "n/a", "none", "null"})
_MAX_LISTED = 5

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Everything that changes the cached array; see `nifti.preprocess`.

  Values are validated and normalised to plain tuples on construction, so a
  bad option fails before any file is read and equal options (e.g. spacing
  given as ints or floats, lists or tuples) share one cache.
  """

  shape: tuple[int, int, int] | None = None
  spacing: tuple[float, float, float] | None = None
  frame: int | None = None
  fit: str = "crop"
  clip_percentiles: tuple[float, float] = (0.5, 99.5)
  intensity_range: tuple[float, float] = (-1.0, 1.0)

  def __post_init__(self):
    shape, spacing, fit, percentiles, intensity_range = nifti.canonical_options(
        shape=self.shape, spacing=self.spacing, fit=self.fit,
        clip_percentiles=self.clip_percentiles, intensity_range=self.intensity_range)
    if self.frame is not None and (isinstance(self.frame, bool)
                                   or not isinstance(self.frame, (int, np.integer))
                                   or self.frame < 0):
      raise DataError(f"--config.data.frame must be an integer >= 0 (or unset), got {self.frame!r}")
    frame = None if self.frame is None else int(self.frame)
    for name, value in (("shape", shape), ("spacing", spacing), ("frame", frame),
                        ("fit", fit), ("clip_percentiles", percentiles),
                        ("intensity_range", intensity_range)):
      object.__setattr__(self, name, value)

  def key(self) -> str:
    """A short stable hash of the parameters and CACHE_VERSION (a directory name)."""
    payload = {"cache_version": CACHE_VERSION, **dataclasses.asdict(self)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

  def load(self, path: PathLike) -> np.ndarray:
    """Reads and preprocesses one file with these parameters."""
    return nifti.load_volume(
        path, shape=self.shape, spacing=self.spacing, frame=self.frame, fit=self.fit,
        clip_percentiles=self.clip_percentiles, intensity_range=self.intensity_range)


# ---------------------------------------------------------------------------
# Finding volumes.


def is_volume_file(path: pathlib.Path) -> bool:
  """Whether a directory entry is one of the dataset's volumes (`find_volumes`' rule)."""
  return nifti.is_nifti(path) and not path.name.startswith(".") and path.is_file()


def normalise_id(cell: str) -> str:
  """A CSV id cell as the subject id it keys: stripped, a `.nii`/`.nii.gz` suffix removed."""
  cell = cell.strip()
  return nifti.subject_id(cell) if nifti.is_nifti(cell) else cell


def read_exclude_list(path: PathLike) -> list[str]:
  """Subject ids (or file names) to leave out, one a line; blank lines and `#` comments ignored."""
  try:
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read the exclude list {os.fspath(path)} (--config.data.exclude): {e}") from e
  return [normalise_id(line) for line in (raw.split("#", 1)[0] for raw in lines) if line.strip()]


def find_volumes(root: PathLike) -> list[pathlib.Path]:
  """The NIfTI files directly in `root`, sorted by name.

  Other files (attributes.csv, notes) and hidden files (e.g. macOS `._x.nii`
  resource forks, which are not NIfTI) are ignored; subdirectories are not
  searched, so a dataset is exactly one directory.

  Raises:
    DataError: `root` is missing, not a directory, or holds no NIfTI file.
  """
  root = pathlib.Path(root)
  if not root.exists():
    raise DataError(f"data directory {root} does not exist; check the path")
  if not root.is_dir():
    raise DataError(f"data directory {root} is not a directory")
  paths = sorted(p for p in root.iterdir() if is_volume_file(p))
  if not paths:
    raise DataError(
        f"data directory {root} contains no NIfTI files ({', '.join(nifti.NIFTI_SUFFIXES)})")
  return paths


# ---------------------------------------------------------------------------
# Attributes CSV.


def read_attributes(
    csv_path: PathLike,
    columns: Sequence[str],
    *,
    categories: Mapping[str, Sequence[str]] | None = None,
    subject_ids: Sequence[str] | None = None,
    strict_ids: bool = True,
    excluded: Iterable[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
  """Reads per-subject attributes as values plus a presence mask.

  Args:
    csv_path: CSV whose id column is `subject_id` (or `id`, `subject`).
    columns: the attribute columns to return, in this order.
    categories: column -> category names; those columns hold the category's
      index (a cell may also give the index itself).
    subject_ids: the row order of the result; None means CSV order.
    strict_ids: require the CSV ids and `subject_ids` to match exactly;
      otherwise extra rows are ignored and subjects without a row get mask 0.
    excluded: subject ids left out of the dataset (data.exclude); their rows
      are ignored, not unknown.

  Returns:
    (values, mask), both float32 (N, len(columns)); missing cells (empty,
    NA, nan) have value 0 and mask 0.

  Raises:
    DataError: naming the file, and row/column where one is at fault.
  """
  columns = tuple(columns)
  categories = {k: tuple(v) for k, v in (categories or {}).items()}
  name = os.fspath(csv_path)
  rows = _parse_csv(name, columns, categories)
  _check_duplicates(name, rows)
  if subject_ids is None:
    subject_ids = [row_id for row_id, _, _ in rows]
  by_id = {row_id: (values, mask) for row_id, values, mask in rows}
  _check_ids(name, set(by_id) - set(excluded), list(subject_ids), strict_ids)
  values = np.zeros((len(subject_ids), len(columns)), dtype=np.float32)
  mask = np.zeros_like(values)
  for i, sid in enumerate(subject_ids):
    if sid in by_id:
      values[i], mask[i] = by_id[sid]
  return values, mask


_Row = tuple[str, list[float], list[float]]


def _parse_csv(name: str, columns: tuple[str, ...],
               categories: dict[str, tuple[str, ...]]) -> list[_Row]:
  """Parses data rows as (id, values, mask), checking every cell."""
  header, id_col, rows = read_table(name)
  return parse_rows(name, header, id_col, rows, columns, categories)


def read_table(name: PathLike) -> tuple[list[str], int, list[tuple[int, list[str]]]]:
  """(stripped header, id column index, [(line number, cells)] of the non-blank data rows).

  The one CSV reader of `jaxldm data prepare` (via `read_attributes`) and `jaxldm data inspect`.
  """
  name = os.fspath(name)
  if not os.path.isfile(name):
    raise DataError(f"attributes CSV {name} does not exist; check the path")
  try:
    with open(name, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM.
      reader = csv.reader(f)
      header = [h.strip() for h in next(reader, [])]
      id_col, _ = _header_columns(name, header, ())
      rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"cannot read attributes CSV {name}: {e}; is it a UTF-8 CSV file?") from e
  return header, id_col, rows


def parse_rows(name: str, header: list[str], id_col: int, rows: list[tuple[int, list[str]]],
               columns: Sequence[str], categories: Mapping[str, Sequence[str]],
               problems: list[str] | None = None) -> list[_Row]:
  """Rows of `read_table` as (id, values, mask) for `columns`.

  problems=None raises the first DataError; a list collects every row's and cell's problem
  instead (a bad cell then counts as missing, a bad row is dropped), as `data inspect` does.
  """
  columns = tuple(columns)
  categories = {k: tuple(v) for k, v in categories.items()}
  _, col_index = _header_columns(name, header, columns)
  out = []
  for line, row in rows:
    try:
      out.append(_parse_row(name, line, row, len(header), id_col, col_index, columns, categories, problems))
    except DataError as e:
      if problems is None:
        raise
      problems.append(str(e))
  return out


def _header_columns(name: str, header: list[str], columns: tuple[str, ...]
                    ) -> tuple[int, list[int]]:
  if not header:
    raise DataError(f"attributes CSV {name} is empty; expected a header row")
  lowered = [h.lower() for h in header]
  id_col = next((lowered.index(c) for c in ID_COLUMNS if c in lowered), None)
  if id_col is None:
    raise DataError(
        f"attributes CSV {name} has no subject id column; name one of "
        f"{', '.join(ID_COLUMNS)} (header: {', '.join(header)})")
  missing = [c for c in columns if c not in header]
  if missing:
    available = [h for i, h in enumerate(header) if i != id_col]
    raise DataError(
        f"attributes CSV {name} has no column(s) {', '.join(missing)}; "
        f"available: {', '.join(available) or '(none)'}")
  return id_col, [header.index(c) for c in columns]


def _parse_row(name: str, line: int, row: list[str], width: int, id_col: int,
               col_index: list[int], columns: tuple[str, ...],
               categories: dict[str, tuple[str, ...]], problems: list[str] | None = None) -> _Row:
  if len(row) > width:
    raise DataError(
        f"attributes CSV {name}, row {line}: {len(row)} cells but the header has {width}")
  row = row + [""] * (width - len(row))  # Short rows: trailing cells missing.
  row_id = row[id_col].strip()
  if not row_id:
    raise DataError(f"attributes CSV {name}, row {line}: empty subject id")
  row_id = normalise_id(row_id)
  values, mask = [], []
  for column, index in zip(columns, col_index):
    try:
      value = _parse_cell(name, line, column, row[index].strip(), categories.get(column))
    except DataError as e:
      if problems is None:
        raise
      problems.append(str(e))
      value = None
    values.append(0.0 if value is None else value)
    mask.append(0.0 if value is None else 1.0)
  return row_id, values, mask


def _parse_cell(name: str, line: int, column: str, cell: str,
                names: tuple[str, ...] | None) -> float | None:
  """One cell as a float, a category index, or None when missing."""
  if names is not None and cell in names:
    return float(names.index(cell))
  if cell.lower() in MISSING_VALUES:
    return None
  where = f"attributes CSV {name}, row {line}, column {column!r}"
  try:
    value = float(cell)
  except ValueError:
    value = None
  if names is not None:
    if value is None or not value.is_integer() or not 0 <= value < len(names):
      raise DataError(
          f"{where}: unknown category {cell!r}; expected one of {', '.join(names)} "
          f"(or an index 0 to {len(names) - 1})")
    return value
  if value is None:
    raise DataError(f"{where}: value {cell!r} is not a number; fix it or leave it empty (text columns "
                    f"need '--config.data.categories={column}=A|B|...')")
  if not math.isfinite(value):
    raise DataError(f"{where}: value {cell!r} is not finite; leave it empty if unknown")
  return value


def _check_duplicates(name: str, rows: list[_Row]) -> None:
  counts = collections.Counter(row_id for row_id, _, _ in rows)
  duplicates = sorted(i for i, n in counts.items() if n > 1)
  if duplicates:
    raise DataError(
        f"attributes CSV {name} has duplicate subject ids: {_listing(duplicates)}; "
        "keep one row per subject")


def _check_ids(name: str, csv_ids: set[str], subject_ids: list[str], strict: bool) -> None:
  if not strict:
    return
  unknown = sorted(csv_ids - set(subject_ids))
  if unknown:
    raise DataError(
        f"attributes CSV {name} has rows for unknown subject ids (no volume): "
        f"{_listing(unknown)}; remove those rows or set --config.data.strict_ids=false")
  without_row = sorted(set(subject_ids) - csv_ids)
  if without_row:
    raise DataError(
        f"attributes CSV {name} has no row for volume(s) {_listing(without_row)}; "
        "add rows (empty cells mark missing values) or set --config.data.strict_ids=false")


def _listing(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"{shown}{more} ({len(items)} in all)"


# ---------------------------------------------------------------------------
# Dataset.


class VolumeDataset:
  """The volumes of one directory with their attributes, preprocessed and cached.

  Items are preprocessed lazily on first access (or all at once by
  `arrays()`) and cached on disk; see the module docstring.

  Attributes:
    root: the data directory.
    paths: the NIfTI files, sorted by name.
    subject_ids: their file names without suffix, the CSV's keys.
    columns: the attribute columns, in the order of `attributes`.
    attributes: float32 (N, A) values, 0 where missing.
    attribute_mask: float32 (N, A), 1 where a value is present.
    preprocessing: the parameters every volume is preprocessed with.
    cache_dir: where preprocessed arrays live (one directory per parameter set).
  """

  def __init__(
      self,
      root: PathLike,
      *,
      preprocessing: Preprocessing = Preprocessing(),
      attributes_csv: PathLike | None = None,
      columns: Sequence[str] = (),
      categories: Mapping[str, Sequence[str]] | None = None,
      strict_ids: bool = True,
      cache_dir: PathLike | None = None,
      progress: bool = False,
      exclude: Iterable[str] = (),
  ):
    """Finds the volumes and reads the attributes; reads no volume yet.

    Args:
      root: directory holding the .nii/.nii.gz files.
      preprocessing: see `Preprocessing`.
      attributes_csv: a CSV path, or None, or "auto": `root/attributes.csv`
        if it exists, else no attributes (`columns` becomes (), with a
        warning). Only read when `columns` are requested.
      columns: attribute columns to load.
      categories: column -> category names (see `read_attributes`).
      strict_ids: see `read_attributes`.
      cache_dir: base directory for the cache; a subdirectory named by
        `preprocessing.key()` is used inside it. Default `root/.jaxldm_cache`.
      progress: show a progress bar while preprocessing in `arrays()`.
      exclude: subject ids (or file names) to leave out, e.g. the bad volumes
        `jaxldm data prepare --exclude-bad FILE` listed; their CSV rows are ignored.
    """
    self.root = pathlib.Path(root)
    self.excluded = {normalise_id(s) for s in exclude}
    paths = find_volumes(self.root)
    self.paths = [p for p in paths if nifti.subject_id(p) not in self.excluded]
    if not self.paths:
      raise DataError(f"data directory {self.root}: all {len(paths)} volume(s) are excluded (data.exclude)")
    self.subject_ids = [nifti.subject_id(p) for p in self.paths]
    self._check_unique_ids()
    self.columns = tuple(columns)
    self.categories = {k: tuple(v) for k, v in (categories or {}).items()}
    self.preprocessing = preprocessing
    self.progress = progress
    self.attributes, self.attribute_mask = self._read_attributes(attributes_csv, strict_ids)
    base = self.root / CACHE_DIRNAME if cache_dir is None else pathlib.Path(cache_dir)
    self.cache_dir = base / preprocessing.key()
    self._make_cache_dir()

  def _check_unique_ids(self) -> None:
    counts = collections.Counter(self.subject_ids)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if duplicates:
      raise DataError(
          f"data directory {self.root} has several files for subject(s) "
          f"{_listing(duplicates)} (e.g. both .nii and .nii.gz); keep one")

  def _read_attributes(self, attributes_csv: PathLike | None,
                       strict_ids: bool) -> tuple[np.ndarray, np.ndarray]:
    csv_path = attributes_csv
    if attributes_csv == "auto":
      csv_path = self.root / ATTRIBUTES_FILENAME
      if not csv_path.is_file() and self.columns:
        warnings.warn(
            f"{csv_path} does not exist, so the dataset has no attributes "
            f"(requested: {', '.join(self.columns)})", stacklevel=3)
        self.columns = ()
    if not self.columns:
      empty = np.zeros((len(self.paths), 0), dtype=np.float32)
      return empty, empty.copy()
    if csv_path is None:
      raise DataError(
          f"attribute columns {', '.join(self.columns)} were requested for {self.root} "
          "but no attributes CSV was given; set --config.data.attributes_csv=PATH, or "
          "--config.data.attributes= for none")
    return read_attributes(csv_path, self.columns, categories=self.categories,
                           subject_ids=self.subject_ids, strict_ids=strict_ids, excluded=self.excluded)

  def fingerprint(self) -> str:
    """sha256 of what a training run reads: file names and contents, attribute columns and rows.

    Pinned by a DP run's privacy ledger (a resume on other data is refused) and recorded by every
    stage, so a DP stage can recognise a model or statistic derived from its own private data
    (docs/privacy.md, "Stages compose"). One digest over the whole set: it reveals nothing about a
    single volume to someone who does not hold the entire dataset.
    """
    h = hashlib.sha256()
    for sid, path in sorted(zip(self.subject_ids, self.paths)):
      h.update(sid.encode() + b"\0")
      with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    h.update(repr(tuple(self.columns)).encode())
    h.update(np.ascontiguousarray(self.attributes, np.float32).tobytes())
    h.update(np.ascontiguousarray(self.attribute_mask, np.float32).tobytes())
    return h.hexdigest()

  def _make_cache_dir(self) -> None:
    try:
      self.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise DataError(
          f"cannot create cache directory {self.cache_dir}: {e}; "
          "set --config.data.cache_dir=DIR to a writable directory") from e

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    """One subject; the volume may be a read-only memory map of the cache."""
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} volumes")
    i %= len(self)
    return {
        "volume": self._volume(i),
        "attributes": self.attributes[i].copy(),
        "attribute_mask": self.attribute_mask[i].copy(),
        "subject_id": self.subject_ids[i],
    }

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[i] for i in range(len(self)))

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everything in memory: volumes (N, D, H, W), attributes and mask (N, A).

    Raises:
      DataError: `preprocessing.shape` is unset, so volumes could differ in shape.
    """
    shape = self.preprocessing.shape
    if shape is None:
      raise DataError(
          f"stacking the volumes of {self.root} needs one shape; "
          "set --config.data.shape=D,H,W (e.g. 12,64,64)")
    volumes = np.empty((len(self), *shape), dtype=np.float32)
    for i in _progress(range(len(self)), f"Preprocessing {self.root.name}", self.progress):
      volumes[i] = self._volume(i)
    return volumes, self.attributes.copy(), self.attribute_mask.copy()

  def preprocess_all(self, progress: bool | None = None) -> list[tuple[str, str]]:
    """Fills the cache for every volume; (subject id, problem) of each one that fails (all, not the first)."""
    bad = []
    for i in _progress(range(len(self)), f"Preprocessing {self.root.name}",
                       self.progress if progress is None else progress):
      try:
        self._volume(i)
      except DataError as e:
        bad.append((self.subject_ids[i], str(e)))
    return bad

  def attribute_stats(self) -> dict[str, dict[str, Any]]:
    """Per column: coverage, and mean/std/min/max over present values (NaN if none).

    Categorical columns also get per-category counts. Meant for a quick look
    before training (is age known for enough subjects? is sex balanced?).
    """
    stats = {}
    for j, column in enumerate(self.columns):
      present = self.attributes[self.attribute_mask[:, j] > 0, j].astype(np.float64)
      entry = {
          "coverage": float(present.size / max(len(self), 1)),
          "count": int(present.size),
          "mean": float(present.mean()) if present.size else math.nan,
          "std": float(present.std()) if present.size else math.nan,
          "min": float(present.min()) if present.size else math.nan,
          "max": float(present.max()) if present.size else math.nan,
      }
      if column in self.categories:
        entry["counts"] = {name: int(np.count_nonzero(present == k))
                           for k, name in enumerate(self.categories[column])}
      stats[column] = entry
    return stats

  # -- Cache. ---------------------------------------------------------------

  def cache_path(self, i: int) -> pathlib.Path:
    """Where volume i is cached: named by subject and by the file's identity."""
    path = self.paths[i].resolve()
    stat = path.stat()
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    return self.cache_dir / f"{self.subject_ids[i]}-{digest}.npy"

  def _volume(self, i: int) -> np.ndarray:
    """Volume i from the cache (memory-mapped), preprocessing it on a miss."""
    target = self.cache_path(i)
    cached = self._read_cached(target)
    if cached is not None:
      return cached
    volume = self.preprocessing.load(self.paths[i])
    _atomic_save(target, volume)
    _remove_stale(target, self.subject_ids[i])
    return volume

  def _read_cached(self, target: pathlib.Path) -> np.ndarray | None:
    """The cached array, or None when absent or unusable (then it is rebuilt)."""
    try:
      array = np.load(target, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
      return None
    shape = self.preprocessing.shape
    if array.dtype != np.float32 or array.ndim != 3 or (shape and array.shape != shape):
      return None
    return array


def _atomic_save(target: pathlib.Path, array: np.ndarray) -> None:
  """Writes via a temp file and `os.replace`, so readers never see half a file.

  Concurrent writers (several processes filling one cache) are safe too: each
  writes its own temp file and the last rename wins with identical content.
  """
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".npy")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array, allow_pickle=False)
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):  # A racing process may have removed it.
      os.unlink(tmp)
    raise


def _remove_stale(target: pathlib.Path, sid: str) -> None:
  """Deletes the subject's entries for older versions of its file."""
  pattern = re.compile(re.escape(sid) + r"-[0-9a-f]{16}\.npy")
  for old in target.parent.iterdir():
    if old != target and pattern.fullmatch(old.name):
      with contextlib.suppress(OSError):  # A racing process may have removed it.
        old.unlink()


def _progress(items: Iterable[int], description: str, enabled: bool) -> Iterable[int]:
  if not enabled:
    return items
  from rich.progress import track  # Imported lazily: only needed for the bar.
  return track(items, description=description)
