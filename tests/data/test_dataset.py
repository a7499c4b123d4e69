"""Tests for jaxldm.data.dataset: finding volumes, attribute CSVs, the cache."""

import os
import pathlib

import nibabel
import numpy as np
import pytest

from jaxldm.data import dataset as ds
from jaxldm.data.errors import DataError

SHAPE = (8, 16, 16)  # (D, H, W) of the stored test volumes.
IDS = ("sub-a", "sub-b", "sub-c")
PREP = ds.Preprocessing(shape=SHAPE)


def _write_volume(path, seed=0, value=None):
  rng = np.random.default_rng(seed)
  stored = SHAPE[::-1]  # Stored (x, y, z); loads as (z, y, x) = SHAPE.
  data = (np.full(stored, value, dtype=np.float32) if value is not None
          else rng.normal(size=stored).astype(np.float32))
  nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), path)
  return pathlib.Path(path)


def _write_csv(path, text):
  path = pathlib.Path(path)
  path.write_text(text)
  return path


@pytest.fixture
def root(tmp_path):
  root = tmp_path / "data"
  root.mkdir()
  for seed, sid in enumerate(IDS):
    suffix = ".nii.gz" if seed % 2 else ".nii"
    _write_volume(root / f"{sid}{suffix}", seed=seed)
  _write_csv(root / "attributes.csv",
             "subject_id,age,sex,bmi\n"
             "sub-a,50,F,22.5\n"
             "sub-b,NA,M,\n"
             "sub-c,70,F,nan\n")
  return root


def _raises(parts, fn, *args, **kwargs):
  with pytest.raises(DataError) as info:
    fn(*args, **kwargs)
  for part in parts:
    assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def _forbid_nifti_reads(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("nibabel.load called although the cache should be used")
  monkeypatch.setattr(nibabel, "load", fail)


# ---------------------------------------------------------------------------
# find_volumes.


def test_find_volumes_sorted_nifti_only(root):
  (root / "notes.txt").write_text("x")
  (root / "._sub-a.nii").write_bytes(b"resource fork")
  (root / "sub").mkdir()
  _write_volume(root / "sub" / "nested.nii")
  assert [p.name for p in ds.find_volumes(root)] == ["sub-a.nii", "sub-b.nii.gz", "sub-c.nii"]


def test_find_volumes_empty_directory_is_an_error(tmp_path):
  (tmp_path / "attributes.csv").write_text("subject_id\n")
  _raises([str(tmp_path), "no NIfTI files"], ds.find_volumes, tmp_path)


def test_find_volumes_missing_directory_is_an_error(tmp_path):
  _raises([str(tmp_path / "gone"), "does not exist"], ds.find_volumes, tmp_path / "gone")


def test_nii_and_nii_gz_of_one_subject_is_an_error(root):
  _write_volume(root / "sub-a.nii.gz")
  _raises(["sub-a", "several files"], ds.VolumeDataset, root, cache_dir=root / "c")


# ---------------------------------------------------------------------------
# Preprocessing.


def test_preprocessing_key_is_stable_and_canonical():
  a = ds.Preprocessing(shape=[8, 16, 16], spacing=(1, 2, 2), clip_percentiles=[1, 99])
  b = ds.Preprocessing(shape=(8, 16, 16), spacing=(1.0, 2.0, 2.0), clip_percentiles=(1.0, 99.0))
  assert a == b and a.key() == b.key()
  assert a.shape == (8, 16, 16) and a.spacing == (1.0, 2.0, 2.0)


@pytest.mark.parametrize(
    "change",
    [dict(shape=(8, 16, 17)), dict(spacing=(1.0, 1.0, 1.0)), dict(frame=1),
     dict(fit="resize"), dict(clip_percentiles=(1.0, 99.0)), dict(intensity_range=(0.0, 1.0))],
)
def test_preprocessing_key_changes_with_each_parameter(change):
  assert ds.Preprocessing(**{"shape": SHAPE, **change}).key() != PREP.key()


def test_preprocessing_key_includes_cache_version(monkeypatch):
  before = PREP.key()
  monkeypatch.setattr(ds, "CACHE_VERSION", ds.CACHE_VERSION + 1)
  assert PREP.key() != before


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(shape=(8, 16)), "shape"), (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
     (dict(frame=-1), "frame"), (dict(fit="squash"), "fit")],
)
def test_preprocessing_rejects_bad_values(kwargs, name):
  _raises([name], ds.Preprocessing, **kwargs)


# ---------------------------------------------------------------------------
# read_attributes.


def test_missing_values_are_carried_as_mask(root):
  values, mask = ds.read_attributes(root / "attributes.csv", ["bmi", "age"],
                                    subject_ids=["sub-c", "sub-a", "sub-b"])
  np.testing.assert_array_equal(mask, [[0, 1], [1, 1], [0, 0]])
  np.testing.assert_array_equal(values, [[0, 70], [22.5, 50], [0, 0]])
  assert values.dtype == mask.dtype == np.float32


def test_categories_become_indices(root):
  values, mask = ds.read_attributes(root / "attributes.csv", ["sex"],
                                    categories={"sex": ("F", "M")})
  np.testing.assert_array_equal(values[:, 0], [0, 1, 0])
  np.testing.assert_array_equal(mask[:, 0], [1, 1, 1])


def test_category_index_cells_and_id_header_variants(tmp_path):
  path = _write_csv(tmp_path / "a.csv", "ID,sex\nx,1\ny,F\nz,\n")
  values, mask = ds.read_attributes(path, ["sex"], categories={"sex": ("F", "M")})
  np.testing.assert_array_equal(values[:, 0], [1, 0, 0])
  np.testing.assert_array_equal(mask[:, 0], [1, 1, 0])


def test_unknown_category_is_an_error(tmp_path):
  path = _write_csv(tmp_path / "a.csv", "subject_id,sex\nx,F\ny,X\n")
  _raises(["a.csv", "row 3", "'sex'", "unknown category 'X'", "F, M"],
          ds.read_attributes, path, ["sex"], categories={"sex": ("F", "M")})


def test_non_numeric_value_is_an_error(tmp_path):
  path = _write_csv(tmp_path / "a.csv", "subject_id,age\nx,50\ny,fifty\n")
  _raises(["a.csv", "row 3", "'age'", "'fifty'", "not a number"],
          ds.read_attributes, path, ["age"])


def test_missing_column_is_an_error(root):
  _raises(["attributes.csv", "weight", "available: age, sex, bmi"],
          ds.read_attributes, root / "attributes.csv", ["age", "weight"])


def test_duplicate_ids_are_an_error(tmp_path):
  path = _write_csv(tmp_path / "a.csv", "subject_id,age\nx,1\ny,2\nx,3\n")
  _raises(["a.csv", "duplicate subject ids", "x (1 in all)"], ds.read_attributes, path, ["age"])


def test_unknown_ids_are_an_error(tmp_path):
  rows = "".join(f"s{i},1\n" for i in range(8))
  path = _write_csv(tmp_path / "a.csv", "subject_id,age\n" + rows)
  _raises(["a.csv", "unknown subject ids", "s1, s2, s3, s4, s5 and 2 more (7 in all)"],
          ds.read_attributes, path, ["age"], subject_ids=["s0"])


def test_volume_without_row_is_an_error(root):
  _write_volume(root / "sub-d.nii")
  _raises(["attributes.csv", "no row for volume(s) sub-d", "--config.data.strict_ids=false"],
          ds.VolumeDataset, root, attributes_csv="auto", columns=["age"], cache_dir=root / "c")


def test_non_strict_ids_mask_missing_rows_and_ignore_extras(root):
  _write_volume(root / "sub-d.nii")
  with open(root / "attributes.csv", "a") as f:
    f.write("sub-zzz,1,F,1\n")
  data = ds.VolumeDataset(root, attributes_csv="auto", columns=["age"], strict_ids=False,
                          cache_dir=root / "c")
  assert data.subject_ids[-1] == "sub-d"
  np.testing.assert_array_equal(data.attribute_mask[:, 0], [1, 0, 1, 0])


def test_missing_csv_is_an_error(root):
  _raises(["nope.csv", "does not exist"], ds.read_attributes, root / "nope.csv", ["age"])


# ---------------------------------------------------------------------------
# VolumeDataset.


def test_items_and_arrays(root):
  data = ds.VolumeDataset(root, preprocessing=PREP, attributes_csv="auto",
                          columns=["age", "sex"], categories={"sex": ["F", "M"]})
  assert len(data) == 3 and data.subject_ids == list(IDS)
  item = data[-1]
  assert item["subject_id"] == "sub-c"
  assert item["volume"].shape == SHAPE and item["volume"].dtype == np.float32
  np.testing.assert_array_equal(item["attributes"], [70, 0])
  volumes, attributes, mask = data.arrays()
  assert volumes.shape == (3, *SHAPE)
  assert volumes.min() >= -1.0 and volumes.max() <= 1.0
  np.testing.assert_array_equal(volumes[2], item["volume"])
  np.testing.assert_array_equal(mask, [[1, 1], [0, 1], [1, 1]])
  with pytest.raises(IndexError):
    data[3]


def test_arrays_needs_a_shape(root):
  data = ds.VolumeDataset(root, cache_dir=root / "c")
  _raises(["--config.data.shape=D,H,W"], data.arrays)


def test_auto_csv_absent_gives_no_attributes(root):
  (root / "attributes.csv").unlink()
  with pytest.warns(UserWarning, match="attributes.csv does not exist"):
    data = ds.VolumeDataset(root, preprocessing=PREP, attributes_csv="auto", columns=["age"])
  assert data.columns == ()
  assert data[0]["attributes"].shape == (0,)


def test_columns_without_csv_is_an_error(root):
  _raises(["age", "--config.data.attributes_csv=PATH"], ds.VolumeDataset, root, columns=["age"])


def test_attribute_stats(root):
  data = ds.VolumeDataset(root, attributes_csv=root / "attributes.csv",
                          columns=["age", "sex", "bmi"], categories={"sex": ("F", "M")})
  stats = data.attribute_stats()
  assert stats["age"]["coverage"] == pytest.approx(2 / 3)
  assert stats["age"]["mean"] == pytest.approx(60.0)
  assert stats["age"]["std"] == pytest.approx(10.0)
  assert (stats["age"]["min"], stats["age"]["max"]) == (50.0, 70.0)
  assert stats["sex"]["counts"] == {"F": 2, "M": 1}
  assert stats["bmi"]["coverage"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------
# Cache.


def test_second_pass_reads_no_nifti(root, monkeypatch):
  first = ds.VolumeDataset(root, preprocessing=PREP, progress=True).arrays()[0]
  assert first.shape == (3, *SHAPE)
  _forbid_nifti_reads(monkeypatch)
  again = ds.VolumeDataset(root, preprocessing=PREP)
  np.testing.assert_array_equal(again.arrays()[0], first)
  np.testing.assert_array_equal(again[1]["volume"], first[1])
  assert again.cache_dir == root / ".jaxldm_cache" / PREP.key()


def test_changed_parameter_uses_another_cache(root):
  a = ds.VolumeDataset(root, preprocessing=PREP)
  b = ds.VolumeDataset(root, preprocessing=ds.Preprocessing(shape=SHAPE, fit="resize"))
  assert a.cache_dir != b.cache_dir
  a.arrays()
  assert not list(b.cache_dir.iterdir())


def test_edited_file_is_read_again(root):
  data = ds.VolumeDataset(root, preprocessing=PREP)
  old = data[0]["volume"].copy()
  path = _write_volume(root / "sub-a.nii", seed=42)
  os.utime(path, ns=(1, 1))  # A different mtime, even on coarse clocks.
  new = data[0]["volume"]
  assert not np.array_equal(old, new)
  assert len([p for p in data.cache_dir.iterdir() if p.name.startswith("sub-a-")]) == 1


def test_corrupt_cache_entry_is_rebuilt(root):
  data = ds.VolumeDataset(root, preprocessing=PREP)
  expected = data[0]["volume"].copy()
  data.cache_path(0).write_bytes(b"garbage")
  np.testing.assert_array_equal(data[0]["volume"], expected)


def test_failed_preprocessing_leaves_no_partial_file(root):
  _write_volume(root / "sub-b.nii.gz", value=3.0)  # Constant: cannot normalise.
  data = ds.VolumeDataset(root, preprocessing=PREP)
  _raises(["sub-b.nii.gz", "constant"], data.arrays)
  assert [p.name for p in data.cache_dir.iterdir()] == [data.cache_path(0).name]


def test_failed_write_leaves_no_partial_file(root, monkeypatch):
  data = ds.VolumeDataset(root, preprocessing=PREP)

  def half_save(f, array, **kwargs):
    f.write(b"\x93NUMPY partial")
    raise OSError("disk full")

  monkeypatch.setattr(np, "save", half_save)
  with pytest.raises(OSError, match="disk full"):
    data[0]
  assert list(data.cache_dir.iterdir()) == []
