"""Tests for the procedural cardiac phantoms and the classical `measure`.

The benchmark is only useful if (a) the attribute table is the truth of what
is rendered, (b) `measure` recovers it from pixels alone, and (c) everything is
reproducible bit for bit. The expensive sets are module-scoped fixtures.
"""

import gzip
import math
import pathlib

import nibabel as nib
import numpy as np
import pytest

from jaxldm.data import nifti, phantoms
from jaxldm.data.phantoms import anatomy, measurement, rendering
from jaxldm.data.errors import DataError

DEFAULT_SPACING = (10.0, 1.8, 1.8)
TINY_SHAPE, TINY_SPACING = (6, 32, 32), (20.0, 3.6, 3.6)


def _measure_all(volumes, spacing):
  rows = [phantoms.measure(v, spacing) for v in volumes]
  return {k: np.array([r[k] for r in rows]) for k in phantoms.MEASURED}


def _pearson(a, b):
  return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def private120():
  volumes, attrs, labels = phantoms.generate(120, seed=0, return_labels=True)
  return volumes, attrs, labels, _measure_all(volumes, DEFAULT_SPACING)


@pytest.fixture(scope="module")
def public60():
  volumes, attrs = phantoms.generate(60, domain="public", seed=0)
  return volumes, attrs, _measure_all(volumes, DEFAULT_SPACING)


# --------------------------------------------------------------------------
# measure recovers the ground truth.
# --------------------------------------------------------------------------


def test_measure_recovers_private_attributes(private120):
  _, attrs, _, meas = private120
  for key in phantoms.MEASURED:
    assert np.all(np.isfinite(meas[key])), key
  assert _pearson(meas["lv_volume_ml"], attrs["lv_volume_ml"]) >= 0.95
  assert _pearson(meas["myo_thickness_mm"], attrs["myo_thickness_mm"]) >= 0.95
  assert _pearson(meas["rv_volume_ml"], attrs["rv_volume_ml"]) >= 0.95
  assert np.mean(np.abs(meas["lv_volume_ml"] - attrs["lv_volume_ml"])) < 4.0
  assert np.mean(np.abs(meas["myo_thickness_mm"] - attrs["myo_thickness_mm"])) < 0.5
  for axis in ("center_y_mm", "center_x_mm"):
    assert np.mean(np.abs(meas[axis] - attrs[axis])) < 1.0


def test_measure_recovers_public_attributes(public60):
  _, attrs, meas = public60
  assert _pearson(meas["lv_volume_ml"], attrs["lv_volume_ml"]) >= 0.95
  assert _pearson(meas["myo_thickness_mm"], attrs["myo_thickness_mm"]) >= 0.95
  assert _pearson(meas["rv_volume_ml"], attrs["rv_volume_ml"]) >= 0.95


def test_measure_recovers_tiny_thick_slice_attributes():
  volumes, attrs = phantoms.generate(50, shape=TINY_SHAPE, spacing=TINY_SPACING, seed=3)
  meas = _measure_all(volumes, TINY_SPACING)
  assert _pearson(meas["lv_volume_ml"], attrs["lv_volume_ml"]) >= 0.95
  assert _pearson(meas["myo_thickness_mm"], attrs["myo_thickness_mm"]) >= 0.95


def test_measure_is_invariant_to_linear_rescaling(private120):
  volumes, attrs, _, meas = private120
  n = 50
  rescaled = [2.0 * (v - v.min()) / (v.max() - v.min()) - 1.0 for v in volumes[:n]]
  meas2 = _measure_all(rescaled, DEFAULT_SPACING)
  for key in phantoms.MEASURED:
    np.testing.assert_allclose(meas2[key], meas[key][:n], rtol=2e-3, atol=0.05)
  assert _pearson(meas2["lv_volume_ml"], attrs["lv_volume_ml"][:n]) >= 0.95
  assert _pearson(meas2["myo_thickness_mm"], attrs["myo_thickness_mm"][:n]) >= 0.95


@pytest.mark.parametrize("make", [
    lambda rng: rng.normal(size=(12, 64, 64)),
    lambda rng: np.abs(rng.normal(size=(12, 64, 64)) + 1j * rng.normal(size=(12, 64, 64))),
    lambda rng: rng.random((12, 64, 64)).astype(np.float16),
    lambda rng: rng.integers(0, 255, (12, 64, 64)).astype(np.uint8),
    lambda rng: np.zeros((12, 64, 64)),
    lambda rng: np.full((12, 64, 64), np.nan),
    lambda rng: np.where(rng.random((12, 64, 64)) > 0.5, np.inf, -np.inf),
    lambda rng: rng.random((12, 64, 64)) > 0.5,
    lambda rng: rng.normal(size=(1, 2, 2)),
    lambda rng: np.zeros((0, 64, 64)),
])
def test_measure_returns_nan_on_garbage(make):
  result = phantoms.measure(make(np.random.default_rng(0)), DEFAULT_SPACING)
  assert set(result) == set(phantoms.MEASURED)
  assert all(isinstance(v, float) and math.isnan(v) for v in result.values())


def test_measure_rejects_bad_rank_spacing_and_dtype():
  vol = np.zeros((12, 64, 64))
  with pytest.raises(DataError):
    phantoms.measure(vol[0], DEFAULT_SPACING)
  with pytest.raises(DataError):
    phantoms.measure(vol[None], DEFAULT_SPACING)
  for spacing in [(0.0, 1.8, 1.8), (10.0, -1.0, 1.8), (10.0, 1.8), (np.nan, 1, 1), "x"]:
    with pytest.raises(DataError):
      phantoms.measure(vol, spacing)
  with pytest.raises(DataError):
    phantoms.measure(vol.astype(complex), DEFAULT_SPACING)


# --------------------------------------------------------------------------
# The attribute table is the truth of what is rendered.
# --------------------------------------------------------------------------


def test_label_volumes_match_attributes(private120):
  """Hard (argmax) labels of 10 mm slices: a few % per volume, nearly unbiased for the LV.

  The exact check is on the fractions (next test); the thin RV crescent tips
  lose to background in the argmax, hence its small negative bias.
  """
  _, attrs, labels, _ = private120
  voxel_ml = float(np.prod(DEFAULT_SPACING)) / 1e3
  for label, key, median_tol, max_tol, bias_tol in ((1, "lv_volume_ml", 0.04, 0.12, 0.02),
                                                    (3, "rv_volume_ml", 0.06, 0.20, 0.06)):
    counted = (labels == label).sum(axis=(1, 2, 3)) * voxel_ml
    rel = (counted - attrs[key]) / attrs[key]
    assert np.median(np.abs(rel)) < median_tol, key
    assert np.abs(rel).max() < max_tol, key
    assert abs(rel.mean()) < bias_tol, key


@pytest.mark.parametrize("domain,shape,spacing", [
    ("private", (12, 64, 64), DEFAULT_SPACING),
    ("public", (12, 64, 64), DEFAULT_SPACING),
    ("public", TINY_SHAPE, TINY_SPACING),
    ("private", (34, 40, 40), (3.0, 1.8, 1.8)),   # small FOV: heart scaled to fit
])
def test_rendered_fractions_match_analytic_volumes(domain, shape, spacing):
  """Supersampled fractions integrate to the closed-form volumes (< 0.6% seen)."""
  sp = np.asarray(spacing)
  voxel_ml = float(np.prod(sp)) / 1e3
  for i in range(4):
    placed, ed, es = _placed(domain, i, shape, sp, es=bool(i % 2))
    frac = rendering._render_fractions(placed, shape, sp)
    heart = es if i % 2 else ed
    assert frac[rendering._LV_BLOOD].sum() * voxel_ml == pytest.approx(heart.lv_ml, rel=0.008)
    assert frac[rendering._LV_MYO].sum() * voxel_ml == pytest.approx(heart.myo_ml, rel=0.008)
    assert frac[rendering._RV_BLOOD].sum() * voxel_ml == pytest.approx(heart.rv_ml, rel=0.008)
    np.testing.assert_allclose(frac.sum(axis=0), 1.0, atol=1e-5)


def test_boundary_supersampling_equals_full_supersampling():
  for domain, shape, spacing in [("public", (12, 64, 64), DEFAULT_SPACING),
                                 ("private", TINY_SHAPE, TINY_SPACING)]:
    sp = np.asarray(spacing)
    for i in range(5):
      placed, _, _ = _placed(domain, i, shape, sp, es=False)
      fast = rendering._render_fractions(placed, shape, sp)
      full = rendering._render_fractions(placed, shape, sp, supersample_all=True)
      np.testing.assert_array_equal(fast, full)


def _placed(domain, index, shape, sp, es):
  rng_anatomy, rng_layout, _ = rendering._subject_streams(0, domain, index)
  dp = phantoms.DOMAIN_PARAMS[domain]
  return anatomy._place(anatomy._draw_subject(rng_anatomy, dp),
                        anatomy._draw_layout(rng_layout, dp), shape, sp, es)


def test_physiological_consistency(private120, public60):
  for attrs in (private120[1], public60[1]):
    assert np.all(attrs["myo_thickness_es_mm"] > attrs["myo_thickness_ed_mm"])
    ef = (attrs["lv_edv_ml"] - attrs["lv_esv_ml"]) / attrs["lv_edv_ml"]
    np.testing.assert_allclose(attrs["lv_ef"], ef, rtol=1e-12)
    rv_ef = (attrs["rv_edv_ml"] - attrs["rv_esv_ml"]) / attrs["rv_edv_ml"]
    np.testing.assert_allclose(attrs["rv_ef"], rv_ef, rtol=1e-12)
    es = attrs["phase"] == 1
    np.testing.assert_array_equal(attrs["lv_volume_ml"],
                                  np.where(es, attrs["lv_esv_ml"], attrs["lv_edv_ml"]))
    np.testing.assert_array_equal(attrs["rv_volume_ml"],
                                  np.where(es, attrs["rv_esv_ml"], attrs["rv_edv_ml"]))
    np.testing.assert_array_equal(
        attrs["myo_thickness_mm"],
        np.where(es, attrs["myo_thickness_es_mm"], attrs["myo_thickness_ed_mm"]))
    assert set(np.unique(attrs["sex"])) <= {0.0, 1.0}
    assert 0.2 < attrs["phase"].mean() < 0.8


def test_same_subject_conserves_myocardium_across_phases():
  _, ed = phantoms.generate(4, phase="ed", seed=5)
  _, es = phantoms.generate(4, phase="es", seed=5)
  assert np.all(ed["phase"] == 0) and np.all(es["phase"] == 1)
  for key in ("lv_edv_ml", "lv_esv_ml", "rv_edv_ml", "myo_thickness_ed_mm",
              "myo_thickness_es_mm", "age", "sex", "bmi", "tilt_deg", "rv_angle_deg"):
    np.testing.assert_array_equal(ed[key], es[key])
  np.testing.assert_allclose(ed["myo_volume_ml"], es["myo_volume_ml"], rtol=1e-9)


def test_domain_shift_is_real(private120, public60):
  priv, pub = private120[1], public60[1]
  assert pub["lv_ef"].std() > 1.8 * priv["lv_ef"].std()
  assert pub["lv_ef"].min() < priv["lv_ef"].min()
  assert pub["age"].min() < 45.0 <= priv["age"].min()
  assert pub["tilt_deg"].mean() > 1.4 * priv["tilt_deg"].mean()
  assert pub["myo_thickness_ed_mm"].max() > priv["myo_thickness_ed_mm"].max()
  noise = {name: np.median([measurement._noise_sd(v) for v in vols[:30]])
           for name, vols in (("private", private120[0]), ("public", public60[0]))}
  assert noise["public"] > 1.5 * noise["private"]
  assert phantoms.DOMAIN_PARAMS["public"] != phantoms.DOMAIN_PARAMS["private"]


# --------------------------------------------------------------------------
# Determinism and arguments.
# --------------------------------------------------------------------------


def test_generate_is_deterministic_and_prefix_stable():
  v3, a3, l3 = phantoms.generate(3, seed=11, return_labels=True)
  v3b, a3b, l3b = phantoms.generate(3, seed=11, return_labels=True)
  v5, a5, l5 = phantoms.generate(5, seed=11, return_labels=True)
  np.testing.assert_array_equal(v3, v3b)
  np.testing.assert_array_equal(l3, l3b)
  np.testing.assert_array_equal(v3, v5[:3])
  np.testing.assert_array_equal(l3, l5[:3])
  for key in phantoms.ATTRIBUTES:
    np.testing.assert_array_equal(a3[key], a3b[key])
    np.testing.assert_array_equal(a3[key], a5[key][:3])
  v_other, a_other = phantoms.generate(3, seed=12)
  assert not np.array_equal(v3, v_other)
  assert not np.array_equal(a3["lv_edv_ml"], a_other["lv_edv_ml"])
  v_pub, _ = phantoms.generate(3, seed=11, domain="public")
  assert not np.array_equal(v3, v_pub)


def test_generate_output_types():
  volumes, attrs = phantoms.generate(2, shape=(13, 96, 96))
  assert volumes.shape == (2, 13, 96, 96) and volumes.dtype == np.float32
  assert list(attrs) == list(phantoms.ATTRIBUTES)
  assert all(a.shape == (2,) and a.dtype == np.float64 for a in attrs.values())
  assert 0.0 <= volumes.min() and volumes.max() < 2.0
  _, _, labels = phantoms.generate(1, return_labels=True)
  assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"n": -1}, {"n": 2.5}, {"n": True},
    {"domain": "hospital"}, {"phase": "systole"}, {"seed": -1}, {"seed": 1.5},
    {"shape": (12, 64)}, {"shape": (12, 64, 0)}, {"shape": (12, 64.5, 64)},
    {"spacing": (10.0, 0.0, 1.8)}, {"spacing": (10.0, 1.8)},
    {"shape": (4, 64, 64)},    # 40 mm through-plane cannot hold a heart
])
def test_generate_rejects_bad_arguments(kwargs):
  args = {"n": 1, **kwargs}
  n = args.pop("n")
  with pytest.raises(DataError):
    phantoms.generate(n, **args)


# --------------------------------------------------------------------------
# write_dataset.
# --------------------------------------------------------------------------


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


def test_write_dataset_is_byte_identical_and_readable(tmp_path):
  a = phantoms.write_dataset(tmp_path / "a", 3, seed=4, progress=False)
  b = phantoms.write_dataset(tmp_path / "b", 3, seed=4, progress=False)
  files = _files(a)
  assert files == _files(b)
  assert set(files) == {"attributes.csv", "phantoms.json",
                        *(f"private-0000{i}.nii.gz" for i in (1, 2, 3)),
                        *(f"labels/private-0000{i}.nii.gz" for i in (1, 2, 3))}
  assert gzip.decompress(files["private-00001.nii.gz"])   # plain, valid gzip

  volumes, attrs, labels = phantoms.generate(3, seed=4, return_labels=True)
  img = nib.load(a / "private-00001.nii.gz")
  assert img.shape == (64, 64, 12)
  assert img.header.get_zooms() == pytest.approx((1.8, 1.8, 10.0))
  np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), (1.8, 1.8, 10.0))
  assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
  centre = img.affine @ np.array([(64 - 1) / 2, (64 - 1) / 2, (12 - 1) / 2, 1.0])
  np.testing.assert_allclose(centre[:3], 0.0, atol=1e-4)   # header stores float32
  assert img.get_data_dtype() == np.int16
  slope = img.dataobj.slope
  assert img.dataobj.inter == 0.0 and slope > 0
  np.testing.assert_allclose(img.get_fdata().transpose(2, 1, 0), volumes[0],
                             atol=0.51 * slope, rtol=0)
  canonical = nib.as_closest_canonical(img)
  np.testing.assert_array_equal(canonical.get_fdata(), img.get_fdata())

  lab = nib.load(a / "labels" / "private-00001.nii.gz")
  assert lab.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(np.asarray(lab.dataobj).transpose(2, 1, 0), labels[0])

  lines = (a / "attributes.csv").read_text().splitlines()
  assert lines[0].split(",") == ["subject_id", *phantoms.ATTRIBUTES]
  assert [ln.split(",")[0] for ln in lines[1:]] == [f"private-0000{i}" for i in (1, 2, 3)]
  row = dict(zip(lines[0].split(","), lines[2].split(",")))
  for key in phantoms.ATTRIBUTES:
    assert float(row[key]) == pytest.approx(attrs[key][1], rel=1e-8, abs=1e-8)


def test_write_dataset_float32_and_other_seed(tmp_path):
  out = phantoms.write_dataset(tmp_path / "f", 1, seed=4, dtype="float32",
                               labels=False, progress=False)
  volumes, _ = phantoms.generate(1, seed=4)
  img = nib.load(out / "private-00001.nii.gz")
  assert img.get_data_dtype() == np.float32
  np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), volumes[0])
  assert not (out / "labels").exists()
  other = phantoms.write_dataset(tmp_path / "g", 1, seed=5, dtype="float32",
                                 labels=False, progress=False)
  assert _files(out)["private-00001.nii.gz"] != _files(other)["private-00001.nii.gz"]


def test_write_dataset_refuses_non_empty_dir_unless_overwrite(tmp_path):
  out = tmp_path / "ds"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="ds"):
    phantoms.write_dataset(out, 1, progress=False)
  with pytest.raises(DataError, match="phantoms.json"):   # never deletes foreign dirs
    phantoms.write_dataset(out, 1, progress=False, overwrite=True)
  assert (out / "notes.txt").read_text() == "keep me"
  (tmp_path / "file").write_text("x")
  with pytest.raises(DataError, match="file"):
    phantoms.write_dataset(tmp_path / "file", 1, progress=False)
  with pytest.raises(DataError):
    phantoms.write_dataset(tmp_path / "x", 1, dtype="uint8", progress=False)

  empty = tmp_path / "empty"
  empty.mkdir()
  phantoms.write_dataset(empty, 1, progress=False)
  with pytest.raises(DataError, match="empty"):
    phantoms.write_dataset(empty, 2, progress=False)
  phantoms.write_dataset(empty, 2, overwrite=True, labels=False)   # with progress bar
  assert sorted(p.name for p in empty.iterdir()) == [
      "attributes.csv", "phantoms.json", "private-00001.nii.gz", "private-00002.nii.gz"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "empty", "file"]


def test_write_dataset_is_atomic(tmp_path, monkeypatch):
  real = nifti.write_nifti
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("simulated interruption")
    return real(*args, **kwargs)

  monkeypatch.setattr(nifti, "write_nifti", failing)
  with pytest.raises(KeyboardInterrupt):
    phantoms.write_dataset(tmp_path / "ds", 4, progress=False)
  assert list(tmp_path.iterdir()) == []   # no dataset, no temporary leftovers

  monkeypatch.setattr(nifti, "write_nifti", real)
  first = phantoms.write_dataset(tmp_path / "ds", 1, progress=False)
  before = _files(first)
  calls.clear()
  monkeypatch.setattr(nifti, "write_nifti", failing)
  with pytest.raises(KeyboardInterrupt):
    phantoms.write_dataset(tmp_path / "ds", 4, progress=False, overwrite=True)
  assert _files(first) == before          # the old dataset is untouched
  assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_package_re_exports_its_public_names():
  """`phantoms.X` and `from jaxldm.data.phantoms import X` name the objects of the submodules."""
  from jaxldm.data.phantoms import (ATTRIBUTES, DOMAIN_PARAMS, DOMAINS, LABELS, MEASURED, PHASES, DomainParams,
                                    generate, measure, subject_id, write_dataset)
  from jaxldm.data.phantoms import files
  assert generate is phantoms.generate is rendering.generate and measure is measurement.measure
  assert write_dataset is files.write_dataset and subject_id("public", 0) == "public-00001"
  assert DOMAIN_PARAMS["private"] is anatomy.DOMAIN_PARAMS["private"]
  assert isinstance(DOMAIN_PARAMS["public"], DomainParams)
  assert ATTRIBUTES[0] == "lv_edv_ml" and set(MEASURED) <= set(ATTRIBUTES) and DOMAINS == ("public", "private")
  assert PHASES == ("random", "ed", "es") and LABELS[1] == "LV blood pool"
  assert all(hasattr(phantoms, name) for name in phantoms.__all__)
