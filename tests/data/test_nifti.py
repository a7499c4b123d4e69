"""Tests for jaxldm.data.nifti: reading, canonical layout, preprocessing, errors."""

import gzip
import pathlib

import nibabel as nib
import numpy as np
import pytest

from jaxldm.data import nifti
from jaxldm.data.errors import DataError

# Stored voxel axes (i, j, k) = (x, y, z) for an axial RAS volume.
NX, NY, NZ = 16, 12, 8


def _volume(shape=(NX, NY, NZ), seed=0):
  """A smooth-ish random volume, so percentiles are well separated."""
  rng = np.random.default_rng(seed)
  return rng.normal(100.0, 20.0, size=shape).astype(np.float32)


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
  affine = np.diag([*spacing, 1.0])
  affine[:3, 3] = origin
  return affine


def _save(path, data, affine=None, cls=nib.Nifti1Image):
  path = pathlib.Path(path)
  nib.save(cls(data, _affine() if affine is None else affine), path)
  return path


def _edit_pixdim(path, index, value):
  """Writes pixdim[index] straight into the header bytes, past nibabel's fixes."""
  raw = bytearray(path.read_bytes())
  offset = 76 + 4 * index  # NIfTI-1: pixdim is float32[8] at byte 76.
  raw[offset:offset + 4] = np.float32(value).astype("<f4").tobytes()
  path.write_bytes(bytes(raw))


def _raises(match_parts, fn, *args, **kwargs):
  with pytest.raises(DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  for part in match_parts:
    assert part in message, f"{part!r} not in {message!r}"
  return message


# ---------------------------------------------------------------------------
# Names.


def test_is_nifti_and_subject_id():
  assert nifti.is_nifti("a/sub-01.nii")
  assert nifti.is_nifti("sub-01.NII.GZ")
  assert not nifti.is_nifti("attributes.csv")
  assert not nifti.is_nifti("sub.gz")
  assert nifti.subject_id("a/sub-01.nii.gz") == "sub-01"
  assert nifti.subject_id(pathlib.Path("b/sub.02.nii")) == "sub.02"


# ---------------------------------------------------------------------------
# Orientation.


def test_axial_ras_loads_as_zyx(tmp_path):
  data = _volume()
  vol, spacing, info = nifti.read_nifti(_save(tmp_path / "a.nii", data))
  np.testing.assert_array_equal(vol, data.transpose(2, 1, 0))
  assert spacing == (1.0, 1.0, 1.0)
  assert info["axcodes"] == "RAS"
  assert info["shape"] == (NX, NY, NZ)
  assert vol.dtype == np.float32 and vol.flags.c_contiguous


def test_ras_and_lps_give_same_array(tmp_path):
  data = _volume()
  ras = _affine((0.9, 0.8, 2.0), origin=(-7.0, -5.0, 3.0))
  flip = np.array([[-1, 0, 0, NX - 1], [0, -1, 0, NY - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
  lps_data = np.ascontiguousarray(data[::-1, ::-1, :])
  a, sa, ia = nifti.read_nifti(_save(tmp_path / "ras.nii", data, ras))
  b, sb, ib = nifti.read_nifti(_save(tmp_path / "lps.nii", lps_data, ras @ flip))
  assert (ia["axcodes"], ib["axcodes"]) == ("RAS", "LPS")
  np.testing.assert_array_equal(a, b)
  assert sa == pytest.approx(sb)


def test_permuted_axes_give_same_array(tmp_path):
  data = _volume()
  ras = _affine((0.9, 0.8, 2.0))
  stored = np.ascontiguousarray(data.transpose(2, 0, 1))  # Slice axis stored first.
  permuted = ras.copy()
  permuted[:, :3] = ras[:, [2, 0, 1]]
  a, sa, _ = nifti.read_nifti(_save(tmp_path / "a.nii", data, ras))
  b, sb, ib = nifti.read_nifti(_save(tmp_path / "b.nii", stored, permuted))
  assert ib["axcodes"] == "SRA"
  np.testing.assert_array_equal(a, b)
  assert sa == pytest.approx(sb)


def test_oblique_affine_loads_closest_canonical(tmp_path):
  angle = np.deg2rad(20.0)
  c, s = np.cos(angle), np.sin(angle)
  rot_x = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
  affine = np.eye(4)
  affine[:3, :3] = rot_x @ np.diag([1.0, 1.0, 3.0])
  vol, spacing, _ = nifti.read_nifti(_save(tmp_path / "obl.nii.gz", _volume(), affine))
  assert vol.shape == (NZ, NY, NX)
  assert spacing == pytest.approx((3.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "columns, expected_shape, expected_spacing",
    [
        # Axial thick slices: voxel k along z, 10 mm.
        ([0, 1, 2], (NZ, NY, NX), (10.0, 1.8, 1.8)),
        # Coronal thick slices: voxel j along z, voxel k along y (10 mm): D = y, H = z.
        ([0, 2, 1], (NZ, NY, NX), (10.0, 1.8, 1.8)),
        # Sagittal thick slices: voxel k along x (10 mm): D = x, H = z, W = y.
        ([2, 1, 0], (NZ, NX, NY), (10.0, 1.8, 1.8)),
    ],
    ids=["axial", "coronal", "sagittal"],
)
def test_thick_slice_axis_becomes_d(tmp_path, columns, expected_shape, expected_spacing):
  # Stored voxel spacing (1.8, 1.8, 10) with k thick; `columns` says which world
  # axis (x, y, z) each voxel axis runs along.
  affine = np.eye(4)
  affine[:3, :3] = 0.0
  for voxel_axis, (world_axis, size) in enumerate(zip(columns, (1.8, 1.8, 10.0))):
    affine[world_axis, voxel_axis] = size
  data = _volume()
  vol, spacing, _ = nifti.read_nifti(_save(tmp_path / "t.nii", data, affine))
  assert vol.shape == expected_shape
  assert spacing == pytest.approx(expected_spacing)
  # The thick voxel axis k is D: each D index is one stored slice.
  np.testing.assert_array_equal(np.sort(vol[3].ravel()), np.sort(data[:, :, 3].ravel()))


def test_spacing_ties_prefer_z_then_y(tmp_path):
  affine = np.diag([2.0, 2.0, 1.0, 1.0])  # x and y tie as thickest: y (A) wins.
  vol, spacing, _ = nifti.read_nifti(_save(tmp_path / "t.nii", _volume(), affine))
  assert vol.shape == (NY, NZ, NX)
  assert spacing == pytest.approx((2.0, 1.0, 2.0))


# ---------------------------------------------------------------------------
# Data types, formats, frames.


def test_scaled_int16_values_are_applied(tmp_path):
  raw = np.arange(NX * NY * NZ, dtype=np.int16).reshape(NX, NY, NZ)
  img = nib.Nifti1Image(raw, _affine())
  img.header.set_slope_inter(0.5, 10.0)
  img.set_data_dtype(np.int16)
  path = tmp_path / "scaled.nii.gz"
  nib.save(img, path)
  vol, _, info = nifti.read_nifti(path)
  assert info["dtype"] == "int16"
  expected = (raw.astype(np.float32) * 0.5 + 10.0).transpose(2, 1, 0)
  np.testing.assert_allclose(vol, expected)
  assert vol.dtype == np.float32


def test_nii_and_nii_gz_load_identically(tmp_path):
  data = _volume()
  a, _, _ = nifti.read_nifti(_save(tmp_path / "a.nii", data))
  b, _, _ = nifti.read_nifti(_save(tmp_path / "b.nii.gz", data))
  np.testing.assert_array_equal(a, b)


def test_nifti2_loads(tmp_path):
  data = _volume()
  path = _save(tmp_path / "v2.nii", data, cls=nib.Nifti2Image)
  vol, _, info = nifti.read_nifti(path)
  assert info["nifti_version"] == 2
  np.testing.assert_array_equal(vol, data.transpose(2, 1, 0))
  assert nifti.header_summary(path)["nifti_version"] == 2


def test_4d_frame_selection(tmp_path):
  frames = np.stack([_volume(seed=s) for s in range(3)], axis=-1)
  path = _save(tmp_path / "cine.nii.gz", frames)
  vol, _, info = nifti.read_nifti(path, frame=2)
  assert info["n_frames"] == 3
  np.testing.assert_array_equal(vol, frames[..., 2].transpose(2, 1, 0))


def test_4d_without_frame_is_an_error(tmp_path):
  path = _save(tmp_path / "cine.nii", np.stack([_volume()] * 3, axis=-1))
  _raises(["cine.nii", "4D with 3 frames", "frame="], nifti.read_nifti, path)


@pytest.mark.parametrize("frame", [3, -1])
def test_4d_frame_out_of_range_is_an_error(tmp_path, frame):
  path = _save(tmp_path / "cine.nii", np.stack([_volume()] * 3, axis=-1))
  _raises(["cine.nii", f"frame={frame}", "out of range"], nifti.read_nifti, path, frame=frame)


def test_4d_singleton_is_3d(tmp_path):
  data = _volume()
  path = _save(tmp_path / "one.nii", data[..., None])
  vol, _, info = nifti.read_nifti(path, frame=0)
  assert info["n_frames"] == 1
  np.testing.assert_array_equal(vol, data.transpose(2, 1, 0))


def test_frame_for_3d_volume_is_an_error(tmp_path):
  path = _save(tmp_path / "vol.nii", _volume())
  assert nifti.read_nifti(path, frame=0)[0].shape == (NZ, NY, NX)
  _raises(["vol.nii", "3D", "frame=1"], nifti.read_nifti, path, frame=1)


def test_header_summary_matches_read(tmp_path):
  affine = np.eye(4)
  affine[:3, :3] = np.array([[1.8, 0, 0], [0, 0, 10.0], [0, 1.8, 0]])
  path = _save(tmp_path / "h.nii.gz", _volume(), affine)
  summary = nifti.header_summary(path)
  vol, spacing, info = nifti.read_nifti(path)
  assert summary["shape"] == vol.shape
  assert summary["spacing"] == spacing
  assert summary["axcodes"] == info["axcodes"] == "RSA"
  assert summary["original_shape"] == (NX, NY, NZ)
  assert (summary["n_frames"], summary["nifti_version"]) == (1, 1)


# ---------------------------------------------------------------------------
# Preprocessing.


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shape=(8, 16, 16)),  # Pads D and H, crops W.
        dict(shape=(4, 8, 20), fit="resize"),
        dict(shape=(8, 16, 16), spacing=(1.5, 0.7, 2.0)),
        dict(shape=(6, 6, 6), spacing=(1.0, 1.0, 1.0), fit="resize",
             intensity_range=(0.0, 1.0), clip_percentiles=(0.0, 100.0)),
    ],
)
def test_load_volume_returns_requested_shape_and_range(tmp_path, kwargs):
  path = _save(tmp_path / "v.nii.gz", _volume(), _affine((0.9, 1.1, 2.5)))
  vol = nifti.load_volume(path, **kwargs)
  lo, hi = kwargs.get("intensity_range", (-1.0, 1.0))
  assert vol.shape == kwargs["shape"]
  assert vol.dtype == np.float32
  assert np.all(np.isfinite(vol))
  assert vol.min() >= lo and vol.max() <= hi
  assert vol.max() > (lo + hi) / 2  # Not all background.


def test_spacing_resamples_to_physical_size(tmp_path):
  path = _save(tmp_path / "v.nii", _volume(), _affine((1.0, 1.0, 2.0)))
  vol = nifti.load_volume(path, spacing=(1.0, 2.0, 4.0))
  assert vol.shape == (2 * NZ, NY // 2, NX // 4)


def test_crop_pads_with_range_low_and_keeps_center():
  vol = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
  out = nifti.preprocess(vol, None, shape=(6, 2, 4), clip_percentiles=(0, 100),
                         intensity_range=(0.0, 63.0))
  assert np.all(out[0] == 0.0) and np.all(out[5] == 0.0)
  np.testing.assert_allclose(out[1:5], vol[:, 1:3, :])


def test_preprocess_leaves_input_untouched():
  vol = _volume((4, 6, 6))
  before = vol.copy()
  nifti.preprocess(vol, (1.0, 1.0, 1.0), target_spacing=(2.0, 2.0, 2.0), shape=(4, 4, 4))
  np.testing.assert_array_equal(vol, before)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(shape=(8, 0, 8)), "shape"),
        (dict(shape=(8, 8)), "shape"),
        (dict(target_spacing=(1.0, -1.0, 1.0)), "target_spacing"),
        (dict(fit="pad"), "fit"),
        (dict(clip_percentiles=(50, 50)), "clip_percentiles"),
        (dict(clip_percentiles=(-1, 99)), "clip_percentiles"),
        (dict(intensity_range=(1.0, -1.0)), "intensity_range"),
    ],
)
def test_preprocess_rejects_bad_arguments(kwargs, expected):
  _raises([expected], nifti.preprocess, _volume((4, 4, 4)), (1.0, 1.0, 1.0), **kwargs)


def test_nearly_constant_between_percentiles_is_an_error():
  vol = np.zeros((8, 8, 8), dtype=np.float32)
  vol[0, 0, 0] = 1.0
  _raises(["sparse.nii", "percentiles", "clip_percentiles"],
          nifti.preprocess, vol, None, source="sparse.nii")
  assert nifti.preprocess(vol, None, clip_percentiles=(0, 100)).max() == 1.0


# ---------------------------------------------------------------------------
# Bad files.


def test_missing_file_is_an_error(tmp_path):
  _raises(["nope.nii", "does not exist"], nifti.read_nifti, tmp_path / "nope.nii")


def test_truncated_gz_is_an_error(tmp_path):
  path = _save(tmp_path / "cut.nii.gz", _volume())
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  _raises(["cut.nii.gz", "cannot read NIfTI", "truncated"], nifti.load_volume, path)


def test_truncated_uncompressed_is_an_error(tmp_path):
  path = _save(tmp_path / "cut.nii", _volume())
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  _raises(["cut.nii", "cannot read NIfTI"], nifti.read_nifti, path)


def test_garbage_bytes_is_an_error(tmp_path):
  path = tmp_path / "junk.nii"
  path.write_bytes(np.random.default_rng(0).bytes(1000))
  _raises(["junk.nii", "cannot read NIfTI"], nifti.read_nifti, path)
  _raises(["junk.nii", "cannot read NIfTI"], nifti.header_summary, path)


def test_gzip_of_garbage_is_an_error(tmp_path):
  path = tmp_path / "junk.nii.gz"
  path.write_bytes(gzip.compress(b"not a nifti header" * 40))
  _raises(["junk.nii.gz", "cannot read NIfTI"], nifti.read_nifti, path)


def test_2d_is_an_error(tmp_path):
  path = _save(tmp_path / "flat.nii", np.ones((8, 8), dtype=np.float32))
  _raises(["flat.nii", "2 dimensions"], nifti.read_nifti, path)


def test_5d_is_an_error(tmp_path):
  path = _save(tmp_path / "five.nii", np.ones((4, 4, 4, 2, 3), dtype=np.float32))
  _raises(["five.nii", "5 dimensions"], nifti.read_nifti, path, frame=0)


@pytest.mark.parametrize("bad, label", [(np.nan, "2 NaN and 0 Inf"), (np.inf, "0 NaN and 2 Inf")])
def test_non_finite_voxels_are_an_error(tmp_path, bad, label):
  data = _volume()
  data[1, 2, 3] = data[4, 5, 6] = bad
  path = _save(tmp_path / "bad.nii.gz", data)
  _raises(["bad.nii.gz", label], nifti.load_volume, path)


def test_constant_volume_is_an_error(tmp_path):
  path = _save(tmp_path / "flat.nii", np.full((NX, NY, NZ), 7.0, dtype=np.float32))
  _raises(["flat.nii", "constant (value 7)", "cannot normalise"], nifti.load_volume, path)


def test_zero_spacing_in_affine_is_an_error(tmp_path):
  header = nib.Nifti1Header()
  header.set_data_shape((NX, NY, NZ))
  header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
  path = tmp_path / "zero.nii"
  nib.save(nib.Nifti1Image(_volume(), None, header=header), path)
  _raises(["zero.nii", "zero voxel spacing"], nifti.read_nifti, path)
  _raises(["zero.nii", "zero voxel spacing"], nifti.header_summary, path)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_positive_pixdim_is_an_error(tmp_path, value):
  path = _save(tmp_path / "pix.nii", _volume())
  _edit_pixdim(path, 1, value)  # nibabel would silently "fix" this on load.
  _raises(["pix.nii", "pixdim", "positive"], nifti.read_nifti, path)


def test_read_returns_an_owned_array_not_a_file_map(tmp_path):
  path = _save(tmp_path / "m.nii", _volume())
  vol, _, _ = nifti.read_nifti(path)
  path.write_bytes(b"")  # Truncating a memory-mapped file would crash a view of it.
  assert np.isfinite(vol.sum())


def test_singular_affine_is_an_error(tmp_path):
  affine = np.eye(4)
  affine[:3, 1] = [1.0, 0.0, 0.0]  # Voxel axes i and j both along x.
  header = nib.Nifti1Header()
  header.set_data_shape((NX, NY, NZ))
  header.set_sform(affine, code=1)
  path = tmp_path / "sing.nii"
  nib.save(nib.Nifti1Image(_volume(), None, header=header), path)
  _raises(["sing.nii", "singular affine"], nifti.read_nifti, path)


def test_canonical_layout_of_image(tmp_path):
  affine = np.diag([1.8, 10.0, 1.8, 1.0])  # Coronal thick slices.
  img = nib.Nifti1Image(_volume(), affine)
  assert nifti.canonical_layout(img) == ((NY, NZ, NX), (10.0, 1.8, 1.8))
  loaded = nib.load(_save(tmp_path / "c.nii", _volume(), affine))
  vol, spacing, _ = nifti.read_nifti(loaded.get_filename())
  assert nifti.canonical_layout(loaded) == (vol.shape, spacing)


# ---------------------------------------------------------------------------
# Writing.


def test_spacing_affine_centres_the_field_of_view():
  affine = nifti.spacing_affine((6, 4, 8), (10.0, 2.0, 1.5))
  np.testing.assert_allclose(np.diag(affine), (1.5, 2.0, 10.0, 1.0))
  np.testing.assert_allclose(affine @ [(8 - 1) / 2, (4 - 1) / 2, (6 - 1) / 2, 1.0], (0, 0, 0, 1))
  assert nib.aff2axcodes(affine) == ("R", "A", "S")
  _raises(["spacing", "positive"], nifti.spacing_affine, (6, 4, 8), (10.0, 0.0, 1.5))


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8"])
def test_written_volume_reads_back_as_the_same_array_and_spacing(tmp_path, dtype):
  rng = np.random.default_rng(3)
  volume = rng.integers(0, 4, size=(5, 7, 9)) if dtype == "uint8" else rng.normal(size=(5, 7, 9))
  spacing = (8.0, 1.25, 0.75)
  path = tmp_path / "v.nii.gz"
  nifti.write_nifti(path, volume, spacing, dtype=dtype, descrip="jaxldm test")
  back, back_spacing, info = nifti.read_nifti(path)
  assert back.shape == volume.shape and back_spacing == pytest.approx(spacing)
  assert info["axcodes"] == "RAS" and info["dtype"] == dtype
  tol = 0.51 * np.abs(volume).max() / 32767 if dtype == "int16" else 1e-6
  np.testing.assert_allclose(back, volume, atol=tol, rtol=0)
  img = nib.load(path)
  np.testing.assert_allclose(img.affine, nifti.spacing_affine(volume.shape, spacing), atol=1e-5)
  assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
  assert img.header["descrip"].tobytes().rstrip(b"\0") == b"jaxldm test"


def test_encoding_is_deterministic_and_descrip_fits_the_header():
  volume = _volume((4, 5, 6))
  first = nifti.encode_nifti(volume, (2.0, 1.0, 1.0), descrip="x" * 100)
  assert first == nifti.encode_nifti(volume, (2.0, 1.0, 1.0), descrip="x" * 100)  # mtime 0: same bytes
  header = nib.Nifti1Image.from_bytes(gzip.decompress(first)).header
  assert header["descrip"].tobytes() == b"x" * 80


def test_writing_rejects_bad_volumes_and_dtypes():
  _raises(["3-D", "(4, 5)"], nifti.encode_nifti, np.zeros((4, 5)), (1.0, 1.0, 1.0))
  _raises(["dtype", "float64"], nifti.encode_nifti, np.zeros((2, 2, 2)), (1.0, 1.0, 1.0), dtype="float64")
