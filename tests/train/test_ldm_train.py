"""The LDM trainer at tiny size: non-private, DP with ledger, budget stop, resume."""

import json

import numpy as np
import pytest

from jaxldm.config import ConfigError, load_config
from jaxldm.privacy import accounting
from jaxldm.train import autoencoder, common, ldm

DATA = {"data.attributes": (), "data.shape": (4, 16, 16), "data.spacing": (20.0, 4.0, 4.0)}
# One attention block (the middle one), not four: what these tests exercise (the trainable
# "attention+conditioning" part included) is there, at ~2/3 of the programs to trace and compile.
SMALL_UNET = {"model.base_channels": 8, "model.context_dim": 8, "model.attention_levels": (), "sampling.num_steps": 2,
              "train.log_every": 1, "train.sample_every": 0, "train.checkpoint_every": 1}


@pytest.fixture(scope="module")
def ae_dir(public_nifti_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ae")
  # On all 4 test devices (the LDM trainers here use 1): test_sample_from_an_ldm_trained_on_fewer_devices.
  config = load_config("autoencoder:tiny", {**DATA, "data.root": str(public_nifti_dir), "train.steps": 1,
                                            "train.batch_size": 4, "train.num_devices": 4})
  autoencoder.train_and_evaluate(config, workdir)
  return workdir


def _ldm_config(spec, data_dir, ae, **overrides):
  base = {**DATA, **SMALL_UNET, "data.root": str(data_dir), "autoencoder_workdir": str(ae)}
  base.update(overrides)
  return load_config(spec, base)


@pytest.fixture(scope="module")
def pretrained_dir(public_nifti_dir, ae_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ldm")
  record = ldm.train_and_evaluate(_ldm_config("ldm:tiny", public_nifti_dir, ae_dir,
                                              **{"train.steps": 2, "train.batch_size": 4, "train.sample_every": 2}), workdir)
  assert record["steps"] == 2 and record["private"] is False and len(record["data_fingerprint"]) == 64
  assert (workdir / "samples" / "samples_000002.png").is_file()
  return workdir


def _dp(tiny_nifti_dir, ae_dir, pretrained_dir, **overrides):
  base = {"pretrained_workdir": str(pretrained_dir), "dp.expected_batch_size": 2,
          "dp.microbatch_size": 2, "dp.delta": 1e-3, "dp.noise_seed": 1234,
          "diffusion.noise_multiplicity": 2, "train.trainable": "attention+conditioning"}
  base.update(overrides)
  return _ldm_config("ldm_dp:tiny", tiny_nifti_dir, ae_dir, **base)


@pytest.mark.all_devices  # The one DP trainer run here sharded over 4 devices (padding to microbatch x 4).
def test_dp_finetune_resumes_and_accounts_every_step(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path):
  # "Killed" after 2 steps (its checkpoint and ledger are on disk), then resumed to 3.
  first = ldm.train_and_evaluate(_dp(tiny_nifti_dir, ae_dir, pretrained_dir, **{"train.steps": 2,
                                 "dp.noise_multiplier": 1.0}), tmp_path)
  assert first["steps"] == 2
  record = ldm.train_and_evaluate(_dp(tiny_nifti_dir, ae_dir, pretrained_dir, **{"train.steps": 3,
                                  "dp.noise_multiplier": 1.0}), tmp_path)
  ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
  assert record["steps"] == ledger["steps"] == 3
  expected = accounting.epsilon(noise_multiplier=1.0, sampling_rate=2 / 8, steps=3, delta=1e-3, accountant="rdp")
  assert record["epsilon"] == pytest.approx(expected, rel=1e-9)
  assert record["noise_seed"].startswith("fixed")  # A fixed seed is flagged in the record.
  assert (tmp_path / "dp_secrets.json").stat().st_mode & 0o777 == 0o600  # Seeds readable by the owner only.
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3]
  for line in lines:  # Aggregates only: no per-example arrays in the logs.
    assert all(not isinstance(v, list) for v in line.values())


def test_dp_stops_before_the_budget(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path):
  sigma, q, delta = 1.0, 2 / 8, 1e-3
  target = accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=2, delta=delta, accountant="rdp") * 1.0001
  record = ldm.train_and_evaluate(_dp(tiny_nifti_dir, ae_dir, pretrained_dir, **{
      "train.steps": 6, "dp.noise_multiplier": sigma, "dp.target_epsilon": target}), tmp_path)
  assert record["stopped_for_budget"] is True
  assert record["steps"] == 2 and record["epsilon"] <= target


def test_dp_per_layer_switch_reaches_the_clipping(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path):
  # Same keys, batches and noise; a small C clips every example, so only the clipping rule differs.
  # The flat run is the other DP tests' program (sigma and C are traced arguments); per-layer
  # clipping is a program of its own.
  runs = {}
  for per_layer in (False, True):
    workdir = tmp_path / str(per_layer)
    runs[per_layer] = ldm.train_and_evaluate(_dp(tiny_nifti_dir, ae_dir, pretrained_dir, **{
        "train.steps": 1, "dp.noise_multiplier": 1e-4, "dp.target_epsilon": 1e9, "dp.l2_clip_norm": 1e-6,
        "dp.per_layer": per_layer}), workdir)
  assert runs[False]["per_layer"] is False and runs[True]["per_layer"] is True
  assert runs[True]["epsilon"] == runs[False]["epsilon"]  # Sensitivity C either way: same accounting.
  logged = {}
  for per_layer in (False, True):  # Every real example was clipped (flat: norm > C; per layer: a leaf).
    logged[per_layer] = json.loads((tmp_path / str(per_layer) / "metrics.jsonl").read_text().splitlines()[-1])
    count = logged[per_layer]["clipped_fraction"] * 2  # Noisy count / expected batch size 2; sigma ~0 here.
    assert round(count) >= 1 and abs(count - round(count)) < 0.02  # Noise std 1e-3.
  # The released (noisy) gradient: flat clipping scales each example's whole gradient to norm C,
  # per-layer clipping each leaf to C / sqrt(leaves): different sums. The noise (std sigma * C /
  # expected batch = 5e-11 per coordinate) is far below the difference.
  norms = [logged[per_layer]["grad_norm"] for per_layer in (False, True)]
  assert abs(norms[0] - norms[1]) > 0.05 * max(norms), norms


def test_dp_refuses_private_attribute_statistics(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path):
  with pytest.raises(ConfigError, match="conditioning.stats_from"):
    ldm.train_and_evaluate(_dp(tiny_nifti_dir, ae_dir, pretrained_dir, **{"conditioning.stats_from": "data"}), tmp_path)


def test_sample_writes_nifti_deterministically(pretrained_dir, tmp_path):
  from jaxldm.data.nifti import load_volume
  from jaxldm.infer import generate

  a, _, _, _ = generate.generate(pretrained_dir, 2, seed=3, num_steps=2)
  b, _, _, _ = generate.generate(pretrained_dir, 2, seed=3, num_steps=2)
  assert a.shape == (2, 4, 16, 16)
  assert (a == b).all()  # Deterministic for a seed.
  out = generate.write_volumes(tmp_path / "s", a, (20.0, 4.0, 4.0))
  files = sorted(out.glob("*.nii.gz"))
  assert len(files) == 2
  loaded = load_volume(files[0], intensity_range=(0.0, 1.0))
  assert loaded.shape == (4, 16, 16)
  with pytest.raises(FileExistsError):
    generate.write_volumes(tmp_path / "s", a, (20.0, 4.0, 4.0))


def test_sample_from_an_ldm_trained_on_fewer_devices(tiny_nifti_dir, ae_dir, tmp_path):
  """AE checkpoint replicated over 4 devices, LDM trained on 1: sampling must not mix device sets."""
  from jaxldm.infer import generate

  workdir = tmp_path / "ldm1"
  ldm.train_and_evaluate(_ldm_config("ldm:tiny", tiny_nifti_dir, ae_dir, **{
      "train.steps": 1, "train.batch_size": 4, "train.sample_every": 0, "train.num_devices": 1}), workdir)
  volumes, _, _, _ = generate.generate(workdir, 2, seed=0, num_steps=2, batch_size=2)
  assert volumes.shape == (2, 4, 16, 16) and np.isfinite(volumes).all()


# ---------------------------------------------------------------------------------------------
# What a DP run releases, and how stages on the same private data compose (docs/privacy.md)
# ---------------------------------------------------------------------------------------------
def test_dp_ldm_logs_carry_no_unnoised_signal(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path):
  from tests.train.test_autoencoder_dp import CANARY, _neighbour_dir, canary_deltas

  run = lambda d, w: ldm.train_and_evaluate(_dp(d, ae_dir, pretrained_dir, **CANARY), w)
  deltas = canary_deltas(run, tiny_nifti_dir, _neighbour_dir(tiny_nifti_dir, tmp_path), tmp_path)
  assert {"loss", "clipped_fraction", "grad_norm", "epsilon"} <= set(deltas)
  assert max(deltas.values()) < 1e-3, deltas


def test_stages_on_the_same_private_data_compose(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path):
  import dp_accounting

  # A DP autoencoder on the private data, then the DP LDM on the same data with it.
  ae_cfg = load_config("autoencoder_dp:tiny", {
      **DATA, "data.root": str(tiny_nifti_dir), "train.steps": 2, "dp.expected_batch_size": 2,
      "dp.microbatch_size": 2, "dp.delta": 1e-3, "dp.noise_multiplier": 1.0, "dp.noise_seed": 5})
  autoencoder.train_and_evaluate(ae_cfg, tmp_path / "ae_dp")
  record = ldm.train_and_evaluate(_dp(tiny_nifti_dir, tmp_path / "ae_dp", pretrained_dir, **{
      "train.steps": 3, "dp.noise_multiplier": 2.0}), tmp_path / "ldm_dp")
  event = lambda sigma, steps: dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(2 / 8, dp_accounting.GaussianDpEvent(sigma)), steps)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.ComposedDpEvent([event(1.0, 2), event(2.0, 3)]))
  assert record["composed_epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-9)
  assert record["composed_epsilon"] > record["epsilon"]
  assert [s["stage"] for s in record["stages"]] == ["autoencoder_workdir", "this run"]
  assert json.loads((tmp_path / "ldm_dp" / "run.json").read_text())["composed_epsilon"] == record["composed_epsilon"]


def test_dp_refuses_nonprivate_inputs_trained_on_its_private_data(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path):
  # An autoencoder and an LDM trained WITHOUT DP on the private data itself.
  leaky_ae = tmp_path / "leaky_ae"
  autoencoder.train_and_evaluate(load_config("autoencoder:tiny", {
      **DATA, "data.root": str(tiny_nifti_dir), "train.steps": 1, "train.batch_size": 4}), leaky_ae)
  with pytest.raises(ConfigError, match="autoencoder_workdir"):
    ldm.train_and_evaluate(_dp(tiny_nifti_dir, leaky_ae, pretrained_dir), tmp_path / "a")
  leaky_ldm = tmp_path / "leaky_ldm"
  ldm.train_and_evaluate(_ldm_config("ldm:tiny", tiny_nifti_dir, ae_dir, **{
      "train.steps": 1, "train.batch_size": 4}), leaky_ldm)
  with pytest.raises(ConfigError, match="pretrained_workdir"):
    ldm.train_and_evaluate(_dp(tiny_nifti_dir, ae_dir, leaky_ldm), tmp_path / "b")
  for refused in ("a", "b"):  # Refused before any step, ledger or recorded config.
    assert not (tmp_path / refused / "privacy_ledger.json").exists()
    assert not (tmp_path / refused / "config.json").exists()


def test_dp_refuses_a_statistics_csv_holding_the_private_rows(tmp_path):
  import types

  from jaxldm.data.dataset import read_attributes

  root = tmp_path / "private"
  root.mkdir()
  rows = "subject_id,lv_edv_ml,age\ns00,120,50\ns01,140,61\n"
  (root / "attributes.csv").write_text(rows)
  vals, msk = read_attributes(root / "attributes.csv", ("lv_edv_ml", "age"), subject_ids=["s00", "s01"])
  dataset = types.SimpleNamespace(root=root, columns=("lv_edv_ml", "age"), subject_ids=["s00", "s01"],
                                  attributes=vals, attribute_mask=msk)
  copy = tmp_path / "stats.csv"  # The same rows in another order: still the private table.
  copy.write_text("subject_id,lv_edv_ml,age\ns01,140,61\ns00,120,50\n")
  for source in (root / "attributes.csv", copy):
    with pytest.raises(ConfigError, match=r"conditioning\.stats_from"):
      ldm._check_public_csv(str(source), dataset)
  public = tmp_path / "public.csv"
  public.write_text("subject_id,lv_edv_ml,age\np00,100,40\np01,150,70\n")
  ldm._check_public_csv(str(public), dataset)  # Other people's rows: allowed.


def test_missing_autoencoder_is_refused_before_anything_is_written(tiny_nifti_dir, tmp_path):
  with pytest.raises(ConfigError, match="autoencoder_workdir"):
    ldm.train_and_evaluate(_ldm_config("ldm:tiny", tiny_nifti_dir, tmp_path / "no_ae"), tmp_path / "run")
  assert not (tmp_path / "run").exists()


# Last in this file: the scan clears JAX's caches, and every later test of the worker traces its programs
# again (the three tests above it paid ~8 s for that).
def test_dp_programs_hold_no_private_data(tiny_nifti_dir, ae_dir, pretrained_dir, tmp_path, program_scan):
  """No program a DP run compiles holds its private examples (they are arguments, never closed-over
  constants), so a persistent XLA cache (`jaxldm ablate`'s WORKDIR/.xla_cache, JAX_COMPILATION_CACHE_DIR)
  stores none. Every program of the run goes through the cache here (jit caches cleared); a program that
  closes over two private latents is caught by the same scan. (The DP autoencoder's:
  test_autoencoder_dp.py.)"""
  config = _dp(tiny_nifti_dir, ae_dir, pretrained_dir, **{"train.steps": 1, "dp.noise_multiplier": 1.0})
  latents = ldm.prepare(config, tmp_path / "probe").examples["latent"]  # The private examples as trained on.
  with program_scan.recording() as run_keys:
    ldm.train_and_evaluate(config, tmp_path / "run")
  names = {k.split("-")[0] for k in run_keys}  # The private step: clipped sums per chunk, then the release.
  assert "jit_release_fn" in names and "jit__lambda" in names and len(run_keys) >= 10, sorted(names)
  assert program_scan.holding(latents, run_keys) == []
  assert len(program_scan.closure_control(latents)) == 1
