"""NIfTI reading, canonical orientation and preprocessing of 3D volumes, and the one NIfTI writer.

Every volume leaves this module as a float32 (D, H, W) array in one shared
layout, so that models never see the scanner's storage order: voxel axes are
first turned to the closest RAS+ orientation, then the axis with the largest
spacing (the slice axis of thick-slice MRI) becomes D. Spacing tuples are
(dz, dy, dx) in mm, in the same order as the array axes. Volumes written by jaxldm
(phantom datasets, generated samples) go through `encode_nifti` / `write_nifti` with one
affine rule (`spacing_affine`), so reading them back gives the same array and spacing.

Every problem a user can cause (a broken file, a 2D image, NaN voxels, a bad
argument) raises `DataError` with a message that names the file.
"""

from __future__ import annotations

import gzip
import math
import mmap
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from jaxldm.data.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")

_FITS = ("crop", "resize")
# Relative tolerance under which two spacings count as equal when picking D.
_SPACING_TIE_RTOL = 1e-3
# Canonical (RAS) axes in the order that wins spacing ties: S, then A, then R.
_TIE_ORDER = (2, 1, 0)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------
# File names.


def is_nifti(path: PathLike) -> bool:
  """Whether `path` names a NIfTI file, judged by its suffix only."""
  return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def subject_id(path: PathLike) -> str:
  """The file name without directory and NIfTI suffix: the key to attribute rows."""
  name = os.path.basename(os.fspath(path))
  lower = name.lower()
  for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
    if lower.endswith(suffix):
      return name[: -len(suffix)]
  return name


# ---------------------------------------------------------------------------
# Argument checks (shared with jaxldm.data.dataset.Preprocessing).


def canonical_options(
    *,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    fit: str = "crop",
    clip_percentiles: Sequence[float] = (0.5, 99.5),
    intensity_range: Sequence[float] = (-1.0, 1.0),
) -> tuple[
    tuple[int, int, int] | None,
    tuple[float, float, float] | None,
    str,
    tuple[float, float],
    tuple[float, float],
]:
  """Validates preprocessing options and returns them as plain tuples.

  Plain int/float tuples make equal options compare and hash equally, which
  the preprocessing cache key relies on (a shape given as a list or a spacing
  given as ints must not create a second cache).

  Raises:
    DataError: naming the first bad argument.
  """
  return (
      _check_shape(shape),
      _check_spacing(spacing, "data.spacing"),
      _check_fit(fit),
      _check_percentiles(clip_percentiles),
      _check_range(intensity_range),
  )


def _check_shape(shape: Sequence[int] | None) -> tuple[int, int, int] | None:
  if shape is None:
    return None
  values = _as_triple(shape, "data.shape")
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
             for v in values):
    raise DataError(f"data.shape must be 3 positive integers D,H,W (--config.data.shape=12,64,64), got {shape!r}")
  return tuple(int(v) for v in values)


def _check_spacing(spacing: Sequence[float] | None, name: str
                   ) -> tuple[float, float, float] | None:
  if spacing is None:
    return None
  values = _as_triple(spacing, name)
  try:
    floats = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    floats = (math.nan,)
  if (any(isinstance(v, bool) for v in values)
      or not all(math.isfinite(v) and v > 0 for v in floats)):
    raise DataError(
        f"{name} must be 3 positive finite numbers (dz, dy, dx) in mm, got {spacing!r}")
  return floats


def _as_triple(value: Any, name: str) -> tuple[Any, ...]:
  if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
    raise DataError(f"{name} must be a sequence of 3 numbers, got {value!r}")
  values = tuple(value)
  if len(values) != 3:
    raise DataError(f"{name} must have 3 entries (D, H, W order), got {value!r}")
  return values


def _check_fit(fit: str) -> str:
  if fit not in _FITS:
    raise DataError(f"--config.data.fit must be one of {', '.join(_FITS)}, got {fit!r}")
  return fit


def _check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
  lo, hi = _as_pair(percentiles, "clip_percentiles")
  if not 0.0 <= lo < hi <= 100.0:
    raise DataError(
        f"data.clip_percentiles must satisfy 0 <= low < high <= 100 (--config.data.clip_percentiles=0.5,99.5), "
        f"got {percentiles!r}")
  return lo, hi


def _check_range(intensity_range: Sequence[float]) -> tuple[float, float]:
  lo, hi = _as_pair(intensity_range, "intensity_range")
  if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
    raise DataError(
        f"data.intensity_range must be finite with low < high (--config.data.intensity_range=-1,1), "
        f"got {intensity_range!r}")
  return lo, hi


def _as_pair(value: Any, name: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise DataError(f"{name} must be a pair of numbers (low, high), got {value!r}") from None
  return lo, hi


# ---------------------------------------------------------------------------
# Reading.


def read_nifti(
    path: PathLike, *, frame: int | None = None
) -> tuple[np.ndarray, tuple[float, float, float], dict[str, Any]]:
  """Reads one volume in the canonical (D, H, W) layout, without resampling.

  Scaled integer data (scl_slope/scl_inter) comes back scaled. Keeping this
  raw (no intensity changes) lets callers inspect real values, e.g. Hounsfield
  units, before `preprocess` maps them to the model's range.

  Args:
    path: a .nii or .nii.gz file, NIfTI-1 or NIfTI-2.
    frame: which frame of a 4D (cine) file to read; required when it has more
      than one frame.

  Returns:
    (volume, spacing, info): float32 (D, H, W) data, its (dz, dy, dx) spacing
    in mm, and a dict with the file's original `shape`, `axcodes` (e.g.
    "LPS"), stored `dtype`, `n_frames` and `nifti_version`.

  Raises:
    DataError: the file is missing, unreadable, not 3D/4D, has NaN/Inf
      voxels or non-positive spacing, or `frame` does not fit it.
  """
  img = _load_image(path)
  shape = _spatial_shape(img, path)
  n_frames = shape[3] if len(shape) == 4 else 1
  index = _frame_index(path, n_frames, frame)
  layout = _Layout.from_header(img, path)
  data = _read_frame(img, path, index)
  _check_finite(data, os.fspath(path))
  volume = layout.apply(data)
  info = {
      "shape": tuple(int(s) for s in img.shape),
      "axcodes": layout.axcodes,
      "dtype": str(img.get_data_dtype()),
      "n_frames": n_frames,
      "nifti_version": _nifti_version(img),
  }
  return volume, layout.spacing, info


def header_summary(path: PathLike) -> dict[str, Any]:
  """Describes a file from its header alone (no voxel data is decompressed).

  Meant for quick dataset surveys (`jaxldm inspect`-style listings) where
  reading every volume would be too slow.

  Returns:
    A dict with `shape` and `spacing` in the canonical (D, H, W) layout that
    `read_nifti` would return, plus the file's `original_shape`, `axcodes`,
    stored `dtype`, `n_frames` and `nifti_version` (1 or 2).

  Raises:
    DataError: as `read_nifti`, except for problems only the voxel data shows.
  """
  img = _load_image(path)
  shape = _spatial_shape(img, path)
  layout = _Layout.from_header(img, path)
  return {
      "shape": layout.volume_shape(shape[:3]),
      "spacing": layout.spacing,
      "original_shape": tuple(int(s) for s in img.shape),
      "axcodes": layout.axcodes,
      "dtype": str(img.get_data_dtype()),
      "n_frames": shape[3] if len(shape) == 4 else 1,
      "nifti_version": _nifti_version(img),
  }


def canonical_layout(img: nib.Nifti1Image
                     ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
  """The (D, H, W) shape and (dz, dy, dx) spacing `read_nifti` would give `img`.

  For callers that already hold a nibabel image (e.g. dataset inspection).

  Raises:
    DataError: as `header_summary`.
  """
  name = img.get_filename() or "<in-memory image>"
  layout = _Layout.from_header(img, name)
  return layout.volume_shape(_spatial_shape(img, name)[:3]), layout.spacing


def _load_image(path: PathLike) -> nib.Nifti1Image:
  """Opens the file lazily (header and affine only) or explains why it cannot."""
  name = os.fspath(path)
  if not os.path.exists(name):
    raise DataError(f"NIfTI file {name} does not exist; check the path")
  if not os.path.isfile(name):
    raise DataError(f"{name} is not a file; expected a .nii or .nii.gz volume")
  try:
    img = nib.load(name)
  except Exception as e:  # nibabel raises many types for broken files.
    raise _unreadable(name, e) from e
  if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass.
    raise DataError(
        f"{name} is a {type(img).__name__}, not NIfTI; convert it to .nii/.nii.gz")
  return img


def _unreadable(name: str, error: BaseException) -> DataError:
  reason = str(error) or type(error).__name__
  return DataError(
      f"cannot read NIfTI file {name}: {reason}; is it truncated or not NIfTI?")


def _nifti_version(img: nib.Nifti1Image) -> int:
  return 2 if isinstance(img, nib.Nifti2Image) else 1


def _spatial_shape(img: nib.Nifti1Image, path: PathLike) -> tuple[int, ...]:
  """The shape as 3D or 4D, dropping singleton trailing axes beyond the 4th."""
  shape = tuple(int(s) for s in img.shape)
  while len(shape) > 4 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) not in (3, 4):
    raise DataError(
        f"{os.fspath(path)} has {len(img.shape)} dimensions (shape {tuple(img.shape)}); "
        "expected a 3D volume or a 4D series of 3D frames")
  return shape


def _frame_index(path: PathLike, n_frames: int, frame: int | None) -> int | None:
  """Checks `frame` against the file: None means the file must be a single volume."""
  name = os.fspath(path)
  if frame is not None and (isinstance(frame, bool)
                            or not isinstance(frame, (int, np.integer))):
    raise DataError(f"--config.data.frame must be an integer >= 0 (or unset), got {frame!r} (reading {name})")
  if n_frames == 1:
    if frame not in (None, 0):
      raise DataError(f"{name} is 3D (one frame) but --config.data.frame={frame} was given; "
                      "leave data.frame unset (or 0) for 3D volumes")
    return None
  if frame is None:
    raise DataError(
        f"{name} is 4D with {n_frames} frames; choose one with --config.data.frame=N (N from 0 to {n_frames - 1})")
  if not 0 <= frame < n_frames:
    raise DataError(
        f"--config.data.frame={frame} is out of range for {name}, which has {n_frames} frames "
        f"(valid: 0 to {n_frames - 1})")
  return int(frame)


def _read_frame(img: nib.Nifti1Image, path: PathLike, index: int | None) -> np.ndarray:
  """Reads (and scales) only the voxels of one frame, straight to float32."""
  proxy = img.dataobj
  full_ndim = len(img.shape)
  try:
    if full_ndim == 3:
      data = np.asarray(proxy, dtype=np.float32)
    else:  # Slicing the proxy reads just this frame from disk.
      tail = (0 if index is None else index,) + (0,) * (full_ndim - 4)
      data = np.asarray(proxy[(slice(None),) * 3 + tail], dtype=np.float32)
  except Exception as e:  # EOFError, zlib.error, OSError, ValueError...
    raise _unreadable(os.fspath(path), e) from e
  if _is_memory_mapped(data):
    # Own the voxels: a view of the file's memory map would break (SIGBUS)
    # if the file were rewritten while the array is alive.
    data = data.copy(order="K")
  return data


def _is_memory_mapped(array: np.ndarray) -> bool:
  base = array
  while base is not None:
    if isinstance(base, (np.memmap, mmap.mmap)):
      return True
    base = getattr(base, "base", None)
  return False


def _check_finite(volume: np.ndarray, source: str) -> None:
  # A float64 sum is finite exactly when every float32 voxel is, without a
  # full-size boolean temporary in the common (clean) case.
  if np.isfinite(np.sum(volume, dtype=np.float64)):
    return
  n_nan = int(np.count_nonzero(np.isnan(volume)))
  n_inf = int(np.count_nonzero(np.isinf(volume)))
  raise DataError(
      f"{source} has {n_nan} NaN and {n_inf} Inf voxels (of {volume.size}); "
      "fix or mask them before training")


# ---------------------------------------------------------------------------
# Orientation.


class _Layout:
  """How stored voxel axes map to the canonical (D, H, W) array.

  Computed from the header alone so that `header_summary` can report the
  shape and spacing a full read would give.
  """

  def __init__(self, ornt: np.ndarray, perm: tuple[int, int, int],
               spacing: tuple[float, float, float], axcodes: str):
    self.ornt = ornt
    self.perm = perm
    self.spacing = spacing
    self.axcodes = axcodes

  @classmethod
  def from_header(cls, img: nib.Nifti1Image, path: PathLike) -> _Layout:
    name = os.fspath(path)
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_pixdims(img, name)
    column_norms = _check_affine(affine, name)
    ornt = nib.orientations.io_orientation(affine)
    if not np.all(np.isfinite(ornt)):
      raise DataError(
          f"{name} has a singular affine (two voxel axes point the same way); "
          "fix its sform/qform")
    ras_spacing = [0.0, 0.0, 0.0]
    for stored_axis, (ras_axis, _) in enumerate(ornt):
      ras_spacing[int(ras_axis)] = float(column_norms[stored_axis])
    perm = _dhw_axes(ras_spacing)
    spacing = tuple(ras_spacing[a] for a in perm)
    axcodes = "".join(str(c) for c in nib.orientations.aff2axcodes(affine))
    return cls(ornt, perm, spacing, axcodes)

  def apply(self, data: np.ndarray) -> np.ndarray:
    """Flips/permutes stored data to RAS, then to (D, H, W), as one copy."""
    ras = nib.orientations.apply_orientation(data, self.ornt)
    return np.ascontiguousarray(np.transpose(ras, self.perm), dtype=np.float32)

  def volume_shape(self, stored_shape: Sequence[int]) -> tuple[int, int, int]:
    ras_shape = [0, 0, 0]
    for stored_axis, (ras_axis, _) in enumerate(self.ornt):
      ras_shape[int(ras_axis)] = int(stored_shape[stored_axis])
    return tuple(ras_shape[a] for a in self.perm)


def _dhw_axes(ras_spacing: Sequence[float]) -> tuple[int, int, int]:
  """Picks D as the thickest RAS axis (ties: S, A, R); H, W keep RAS order reversed.

  Putting the slice axis first means thick-slice and isotropic scans share the
  same meaning of D, H, W, so crops and resizes treat slices consistently.
  """
  largest = max(ras_spacing)
  d = next(a for a in _TIE_ORDER
           if ras_spacing[a] >= largest * (1.0 - _SPACING_TIE_RTOL))
  h, w = sorted((a for a in range(3) if a != d), reverse=True)
  return d, h, w


def _check_pixdims(img: nib.Nifti1Image, name: str) -> None:
  """Rejects zero/negative/non-finite pixdim as stored in the file.

  nibabel silently replaces such pixdims when it loads a header (abs() or 1),
  which would hide a hand-edited or corrupt header; so the raw header is
  re-read without those fixes. It is only ~350 bytes.
  """
  header = img.header
  if img.get_filename() is not None:
    try:
      with nib.openers.ImageOpener(img.get_filename()) as f:
        header = type(img.header).from_fileobj(f, check=False)
    except Exception as e:
      raise _unreadable(name, e) from e
  pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
  if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
    raise DataError(
        f"{name} has invalid voxel spacing in its header: pixdim[1:4] = "
        f"{tuple(float(p) for p in pixdim)}; spacing must be positive; fix the header")


def _check_affine(affine: np.ndarray, name: str) -> np.ndarray:
  """Returns the voxel sizes along stored axes, if the affine is usable."""
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise DataError(f"{name} has a non-finite or malformed affine; fix its sform/qform")
  norms = np.linalg.norm(affine[:3, :3], axis=0)
  if not np.all(norms > 0):
    raise DataError(
        f"{name} has zero voxel spacing in its affine (column norms "
        f"{tuple(round(float(n), 6) for n in norms)}); fix its sform/qform")
  return norms


# ---------------------------------------------------------------------------
# Preprocessing.


def preprocess(
    volume: np.ndarray,
    spacing: Sequence[float] | None,
    *,
    shape: Sequence[int] | None = None,
    target_spacing: Sequence[float] | None = None,
    fit: str = "crop",
    clip_percentiles: Sequence[float] = (0.5, 99.5),
    intensity_range: Sequence[float] = (-1.0, 1.0),
    source: str = "<array>",
) -> np.ndarray:
  """Resamples, normalises and fits a canonical volume for the model.

  Order matters: resampling first makes percentiles describe the tissue at
  the training resolution, and fitting last lets padding use exactly the
  lower end of `intensity_range` (the normalised background).

  Args:
    volume: (D, H, W) array, e.g. from `read_nifti`.
    spacing: its (dz, dy, dx) in mm; only needed with `target_spacing`.
    shape: output (D, H, W); None keeps whatever resampling gives.
    target_spacing: resample (linear) to this (dz, dy, dx) first.
    fit: how to reach `shape`: "crop" center-crops/pads each axis (keeps the
      physical scale), "resize" resamples (keeps the whole field of view).
    clip_percentiles: intensities are clipped to these percentiles, which
      removes outliers (metal, bright vessels) before scaling.
    intensity_range: the (low, high) the clipped intensities map to.
    source: a name for error messages, usually the file path.

  Returns:
    A C-contiguous float32 array, exactly `shape` when given, finite, with
    values within `intensity_range`.

  Raises:
    DataError: bad arguments, a non-3D / non-finite / constant volume.
  """
  shape, _, fit, (p_lo, p_hi), (r_lo, r_hi) = canonical_options(
      shape=shape, fit=fit, clip_percentiles=clip_percentiles,
      intensity_range=intensity_range)
  target_spacing = _check_spacing(target_spacing, "target_spacing")
  if target_spacing is not None:
    if spacing is None:
      raise DataError(f"{source}: its spacing is needed to resample to target_spacing")
    spacing = _check_spacing(spacing, f"spacing of {source}")
  vol = np.asarray(volume, dtype=np.float32)
  if vol.ndim != 3 or vol.size == 0:
    raise DataError(f"{source} must be a non-empty 3D (D, H, W) array, got shape {vol.shape}")
  _check_finite(vol, source)
  _check_not_constant(vol, source)
  if target_spacing is not None:
    vol = _resample_to_spacing(vol, spacing, target_spacing)
  vol = _normalise(vol, (p_lo, p_hi), (r_lo, r_hi), source)
  if shape is not None:
    vol = _center_fit(vol, shape, r_lo) if fit == "crop" else _resize(vol, shape)
  np.clip(vol, r_lo, r_hi, out=vol)  # Interpolation and rounding stay in range.
  return np.ascontiguousarray(vol, dtype=np.float32)


def load_volume(
    path: PathLike,
    *,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    frame: int | None = None,
    fit: str = "crop",
    clip_percentiles: Sequence[float] = (0.5, 99.5),
    intensity_range: Sequence[float] = (-1.0, 1.0),
) -> np.ndarray:
  """Reads a file and preprocesses it: the one call datasets need per volume.

  `spacing` is the target spacing to resample to (None keeps the file's).
  See `read_nifti` and `preprocess` for the rest.
  """
  # Check options before the (possibly slow) read, so typos fail fast.
  canonical_options(shape=shape, spacing=spacing, fit=fit,
                    clip_percentiles=clip_percentiles, intensity_range=intensity_range)
  volume, file_spacing, _ = read_nifti(path, frame=frame)
  return preprocess(
      volume, file_spacing, shape=shape, target_spacing=spacing, fit=fit,
      clip_percentiles=clip_percentiles, intensity_range=intensity_range,
      source=os.fspath(path))


def _check_not_constant(vol: np.ndarray, source: str) -> None:
  lo, hi = float(vol.min()), float(vol.max())
  if lo == hi:
    raise DataError(f"{source} is constant (value {lo:g}); cannot normalise")


def _resample_to_spacing(vol: np.ndarray, spacing: Sequence[float],
                         target: Sequence[float]) -> np.ndarray:
  out_shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(vol.shape, spacing, target))
  return _resize(vol, out_shape)


def _resize(vol: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Linear resampling to exactly `shape` (corner-aligned, like zoom's default)."""
  if tuple(vol.shape) == tuple(shape):
    return vol
  factors = [t / n for t, n in zip(shape, vol.shape)]
  out = ndimage.zoom(vol, factors, order=1, output=np.float32, mode="nearest")
  if out.shape != tuple(shape):  # Never seen; guards against rounding in scipy.
    out = _center_fit(out, shape, float(out.min()))
  return out


def _normalise(vol: np.ndarray, percentiles: tuple[float, float],
               out_range: tuple[float, float], source: str) -> np.ndarray:
  """Clips to percentiles and maps linearly to `out_range`, in float32."""
  lo, hi = (float(v) for v in np.percentile(vol, percentiles))
  if not hi > lo:
    raise DataError(
        f"{source} is constant between its {percentiles[0]:g} and {percentiles[1]:g} "
        f"percentiles (value {lo:g}); cannot normalise; widen clip_percentiles, "
        "e.g. (0, 100)")
  out = np.clip(vol, lo, hi)  # New array: the caller's volume is never modified.
  out -= lo
  out *= (out_range[1] - out_range[0]) / (hi - lo)
  out += out_range[0]
  return out


def _center_fit(vol: np.ndarray, shape: Sequence[int], pad_value: float) -> np.ndarray:
  """Center-crops or pads each axis to `shape`, without resampling."""
  out = np.full(shape, pad_value, dtype=np.float32)
  src, dst = [], []
  for n, t in zip(vol.shape, shape):
    size = min(n, t)
    start_src, start_dst = (n - size) // 2, (t - size) // 2
    src.append(slice(start_src, start_src + size))
    dst.append(slice(start_dst, start_dst + size))
  out[tuple(dst)] = vol[tuple(src)]
  return out


# ---------------------------------------------------------------------------
# Writing: one affine rule for every file jaxldm writes (phantoms, samples).

WRITE_DTYPES = ("float32", "int16", "uint8")
_DESCRIP_BYTES = 80  # Size of the NIfTI-1 header's descrip field.


def spacing_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
  """The affine of a written (D, H, W) volume: voxel (i, j, k) = (w, h, d) -> world (x, y, z) in mm.

  diag(dx, dy, dz) plus the translation that puts the field-of-view centre at world (0, 0, 0). The
  voxel axes already point +x, +y, +z (RAS), so a reader that reorients to RAS and takes the
  thickest axis as D (`read_nifti`) gets back the array and its spacing exactly, with no flips.
  Every writer uses this one rule, so phantoms and generated samples share one geometry.
  """
  d_n, h_n, w_n = (int(n) for n in shape)
  dz, dy, dx = _check_spacing(spacing, "spacing")
  affine = np.diag([dx, dy, dz, 1.0])
  affine[:3, 3] = [-dx * (w_n - 1) / 2.0, -dy * (h_n - 1) / 2.0, -dz * (d_n - 1) / 2.0]
  return affine


def encode_nifti(volume: np.ndarray, spacing: Sequence[float], *, dtype: str = "float32",
                 descrip: str = "") -> bytes:
  """Deterministic .nii.gz bytes of a (D, H, W) volume: the same arguments give the same bytes.

  Stored as (W, H, D) (`volume.transpose(2, 1, 0)`) with `spacing_affine` as qform and sform
  (code 1, mm). dtype: "float32", "uint8" (label maps) or "int16" (scl_slope = max|v| / 32767,
  scl_inter = 0, so values round-trip within slope / 2: a quarter of the size of float32).
  descrip: the header's description, cut to its 80 bytes (e.g. marks files as synthetic).
  gzip runs with mtime 0 and no file name, so reruns are byte-identical.
  """
  arr = np.asarray(volume)
  if arr.ndim != 3:
    raise DataError(f"a volume to write must be 3-D (D, H, W), got shape {arr.shape}")
  if dtype not in WRITE_DTYPES:
    raise DataError(f"NIfTI dtype must be one of {', '.join(WRITE_DTYPES)}, got {dtype!r}")
  affine = spacing_affine(arr.shape, spacing)
  arr = np.ascontiguousarray(arr.transpose(2, 1, 0))
  slope = None
  if dtype == "int16":
    peak = float(np.max(np.abs(arr))) if arr.size else 0.0
    slope = np.float32(peak / 32767.0) if peak > 0 else np.float32(1.0)
    arr = np.clip(np.rint(arr / slope), -32767, 32767).astype(np.int16)
  else:
    arr = arr.astype(np.dtype(dtype))
  img = nib.Nifti1Image(arr, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  header = img.header
  header.set_xyzt_units("mm")
  header["descrip"] = descrip.encode()[:_DESCRIP_BYTES]
  if slope is not None:
    header.set_slope_inter(float(slope), 0.0)
  return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_nifti(path: PathLike, volume: np.ndarray, spacing: Sequence[float], *, dtype: str = "float32",
                descrip: str = "") -> None:
  """Writes `encode_nifti(volume, spacing, ...)` to `path` (a .nii.gz name)."""
  data = encode_nifti(volume, spacing, dtype=dtype, descrip=descrip)
  with open(path, "wb") as f:
    f.write(data)
