"""`jaxldm ablate` on tiny phantoms: vmapped seeds equal separate runs, a 2 x 2 grid end to end, resume."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxldm import ablate, cli
from jaxldm.config import load_config
from jaxldm.data import phantoms
from jaxldm.train import autoencoder, common, ldm, ldm_seeds, ssl

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE, SPACING = (6, 32, 32), (20.0, 3.6, 3.6)
DATA = {"data.shape": SHAPE, "data.spacing": SPACING, "data.attributes": ("lv_edv_ml", "lv_esv_ml", "phase")}
RUN_OVERRIDES = ("data.shape=6,32,32", "data.spacing=20,3.6,3.6", "data.attributes=lv_edv_ml,lv_esv_ml,phase",
                 "model.base_channels=8", "model.context_dim=8", "model.channel_mult=1", "model.attention_levels=()",
                 "train.steps=2", "train.log_every=1",
                 "train.sample_every=0", "train.checkpoint_every=2", "dp.expected_batch_size=2",
                 "dp.microbatch_size=2", "dp.delta=1e-3")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """Public, private and held-out phantoms; a 1-step AE, public LDM and SSL encoder."""
  root = tmp_path_factory.mktemp("ablate")
  for name, n, seed in (("public", 8, 0), ("private", 8, 1), ("real", 6, 2)):
    phantoms.write_dataset(root / name, n, domain="public" if name == "public" else "private", shape=SHAPE,
                           spacing=SPACING, seed=seed, progress=False)
  one_step = {"train.steps": 1, "train.batch_size": 4, "train.log_every": 1, "train.checkpoint_every": 1}
  autoencoder.train_and_evaluate(load_config(str(ROOT / "configs/autoencoder.py:tiny"), {
      **DATA, **one_step, "data.root": str(root / "public"), "train.sample_every": 0}), root / "ae")
  ldm.train_and_evaluate(load_config(str(ROOT / "configs/ldm.py:tiny"), {
      **DATA, **one_step, "data.root": str(root / "public"), "autoencoder_workdir": str(root / "ae"),
      "model.base_channels": 8, "model.context_dim": 8, "model.channel_mult": (1,), "model.attention_levels": (),
      "train.sample_every": 0}), root / "ldm")
  ssl.train_and_evaluate(load_config(str(ROOT / "configs/ssl.py:tiny"), {
      **DATA, **one_step, "data.root": str(root / "public"), "train.batch_size": 8, "train.num_devices": 1}),
      root / "ssl")
  return root


def _overrides(root, **extra):
  o = {"base.autoencoder_workdir": str(root / "ae"), "base.pretrained_workdir": str(root / "ldm"),
       "base.data_root": str(root / "private"), "base.scratch_stats_from": str(root / "public" / "attributes.csv"),
       "base.overrides": RUN_OVERRIDES, "eval.real": str(root / "real"), "eval.n": 4, "eval.steps": 2,
       "eval.batch_size": 4, "eval.feature_weights": str(root / "ssl"),
       "grid.target_epsilon": (3.0, 10.0), "grid.pretrained": (True, False), "grid.noise_multiplicity": (2,),
       "grid.l2_clip_norm": (1.0,), "grid.seeds": (0,), "vmap_seeds": True}
  o.update(extra)
  return o


def _params(workdir):
  ckpt = common.Checkpointer(workdir / "checkpoints")
  leaves = jax.tree_util.tree_leaves(ckpt.restore_tree("params")[0])
  ckpt.close()
  return leaves


def test_runs_are_named_by_their_settings(pipeline):
  config = load_config(str(ROOT / "configs/ablation.py:tiny"), _overrides(pipeline, **{
      "grid.target_epsilon": (10.0, float("inf")), "grid.seeds": (0, 1)}))
  runs = ablate.expand(config)
  assert [r.name for r in runs][:2] == ["eps10-pre-K2-C1-s0", "eps10-pre-K2-C1-s1"]
  assert len(runs) == 8 and runs[0].setting == runs[1].setting
  dp_cfg = ablate.run_config(config, runs[1])
  assert dp_cfg.dp.enabled and dp_cfg.dp.target_epsilon == 10.0 and dp_cfg.dp.noise_seed == 2
  assert dp_cfg.pretrained_workdir == str(pipeline / "ldm") and dp_cfg.train.steps == 2
  scratch = ablate.run_config(config, next(r for r in runs if not r.pretrained))
  assert scratch.pretrained_workdir == "" and scratch.conditioning.stats_from.endswith("attributes.csv")
  nonprivate = ablate.run_config(config, next(r for r in runs if not r.private))
  assert not nonprivate.dp.enabled and nonprivate.data.root == str(pipeline / "private")


def test_vmapped_seeds_equal_separate_runs(pipeline, tmp_path):
  config = load_config(str(ROOT / "configs/ablation.py:tiny"), _overrides(pipeline, **{
      "grid.target_epsilon": (10.0,), "grid.pretrained": (True,), "grid.seeds": (0, 1)}))
  runs = ablate.expand(config)
  configs = [ablate.run_config(config, r) for r in runs]
  separate = [ldm.train_and_evaluate(c, tmp_path / "separate" / r.name) for c, r in zip(configs, runs)]
  vmapped = ldm_seeds.train_seeds(configs, [tmp_path / "vmapped" / r.name for r in runs])
  for r, a, b in zip(runs, separate, vmapped):
    assert b["steps"] == a["steps"] == 2 and b["vmapped_seeds"] == 2
    assert b["epsilon"] == a["epsilon"] and b["noise_multiplier"] == a["noise_multiplier"]
    pa, pb = _params(tmp_path / "separate" / r.name), _params(tmp_path / "vmapped" / r.name)
    assert max(float(np.abs(x - y).max()) for x, y in zip(pa, pb)) < 1e-5
    ledger = json.loads((tmp_path / "vmapped" / r.name / "privacy_ledger.json").read_text())
    assert ledger["steps"] == 2 and ledger["noise_seed_provenance"].startswith("fixed")
  # The seeds really differ (own batches and noise): otherwise equality above would be trivial.
  p0, p1 = _params(tmp_path / "vmapped" / runs[0].name), _params(tmp_path / "vmapped" / runs[1].name)
  assert max(float(np.abs(x - y).max()) for x, y in zip(p0, p1)) > 1e-4


def test_grid_end_to_end_and_rerun_does_no_work(pipeline, tmp_path):
  overrides = _overrides(pipeline)
  config = load_config(str(ROOT / "configs/ablation.py:tiny"), overrides)
  before = set(common._JITTED)
  result = ablate.ablate(config, tmp_path)
  assert result["trained"] == 4 and result["evaluated"] == 4
  # Four runs of the same shapes (two epsilons, pretrained or not) share one jitted step.
  assert len(set(common._JITTED) - before) <= 1
  csv_text = (tmp_path / "ablation.csv").read_text()
  lines = csv_text.splitlines()
  assert lines[0].split(",")[:7] == ["name", "target_epsilon", "pretrained", "noise_multiplicity", "l2_clip_norm",
                                     "seed", "epsilon"]
  assert sorted(l.split(",")[0] for l in lines[1:]) == sorted(
      ["eps3-pre-K2-C1-s0", "eps10-pre-K2-C1-s0", "eps3-scratch-K2-C1-s0", "eps10-scratch-K2-C1-s0"])
  for r in result["rows"]:
    assert 0 < r["epsilon"] <= r["target_epsilon"] and r["steps"] == 2
    assert np.isfinite(r["fid"]) and 0 <= r["copy_rate"] <= 1 and r["wall_s"] > 0
    assert 0 <= r["latent_copy_rate"] <= 1 and -1 <= r["latent_nn_correlation"] <= 1
  assert (tmp_path / "ablation.png").stat().st_size > 5000
  mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}

  # Again, through the CLI: every run has its report, so nothing is trained or evaluated.
  args = ["ablate", "--config", str(ROOT / "configs/ablation.py:tiny"), "--workdir", str(tmp_path)]
  args += [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in overrides.items()]
  assert cli.main(args) == 0
  assert (tmp_path / "ablation.csv").read_text() == csv_text
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()} == mtimes


def _row(eps, pretrained, seed, fid, copy, r, achieved=None):
  return {"name": f"x{seed}", "target_epsilon": eps, "pretrained": pretrained, "noise_multiplicity": 2,
          "l2_clip_norm": 1.0, "seed": seed, "epsilon": eps if achieved is None else achieved, "delta": 1e-5,
          "rero_bound": 0.07, "fid": fid, "kid": 0.0, "copy_rate": copy, "train_copied_rate": copy / 4,
          "nn_correlation": 0.9, "latent_copy_rate": copy / 2, "latent_nn_correlation": 0.5,
          "safeguard_rejected_fraction": copy, "controllability_r": r}


def test_mean_ci_is_the_student_t_interval():
  mean, half, n = ablate.mean_ci([1.0, 2.0, 3.0, None, float("nan")])
  # sd 1, n 3: t(0.975, 2) = 4.3027 -> 4.3027 / sqrt(3).
  assert (mean, n) == (2.0, 3) and abs(half - 4.302653 / np.sqrt(3)) < 1e-5
  assert ablate.mean_ci([5.0])[0] == 5.0 and np.isnan(ablate.mean_ci([5.0])[1])
  assert ablate.mean_ci([])[2] == 0


def test_summary_groups_seeds_and_reports_the_pretraining_ratio(tmp_path):
  inf = float("inf")
  rows = [_row(10.0, True, s, fid, 0.0, 0.5, achieved=9.99) for s, fid in enumerate((1.0, 2.0, 3.0))]
  rows += [_row(10.0, False, s, fid, 0.0, 0.0, achieved=9.99) for s, fid in enumerate((8.0, 8.0, 8.0))]
  rows += [_row(inf, True, s, 0.5, c, 0.9) for s, c in enumerate((0.25, 0.5, 0.75))]
  summary = ablate.summarize(rows)
  assert [(s["target_epsilon"], s["pretrained"], s["seeds"]) for s in summary] == [
      (10.0, True, 3), (inf, True, 3), (10.0, False, 3)]
  assert summary[0]["fid"] == 2.0 and summary[1]["copy_rate"] == 0.5 and summary[2]["fid_ci"] == 0.0
  assert np.isinf(summary[1]["epsilon"])
  text = ablate.summary_markdown(summary)
  # epsilon, delta and the ReRo bound are constants of a setting (no interval); then FID, KID, copy rate,
  # training volumes copied, NN correlation, latent copy rate and NN correlation, safeguard, controllability.
  assert ("| 10 | pretrained | 9.99 | 1e-05 | 0.07 | 2 ± 2.5 | 0 ± 0 | 0.00 ± 0.00 | 0.00 ± 0.00 "
          "| 0.9000 ± 0.0000 | 0.00 ± 0.00 | 0.500 ± 0.000 | 0.00 ± 0.00 | 0.50 ± 0.00 | 3 |") in text
  assert summary[1]["latent_copy_rate"] == 0.25
  assert "| inf | pretrained | inf |" in text
  assert "FID pretrained / scratch (means): epsilon 10: 0.25." in text
  assert "For the data owner only — do not release" in text  # Copy rates come from the private data.
  ablate.plot(summary, tmp_path / "p.png")
  assert (tmp_path / "p.png").stat().st_size > 5000


def test_nonprivate_overrides_apply_to_epsilon_inf_runs_only(pipeline):
  config = load_config(str(ROOT / "configs/ablation.py:tiny"), _overrides(pipeline, **{
      "grid.target_epsilon": (10.0, float("inf")), "base.nonprivate_overrides": ("train.steps=7",)}))
  runs = ablate.expand(config)
  steps = {r.private: ablate.run_config(config, r).train.steps for r in runs}
  assert steps == {True: 2, False: 7}


def test_missing_inputs_are_named_before_anything_is_written(pipeline, tmp_path):
  from jaxldm.config import ConfigError

  for key in ("base.data_root", "base.pretrained_workdir", "base.autoencoder_workdir", "eval.real"):
    config = load_config(str(ROOT / "configs/ablation.py:tiny"), _overrides(pipeline, **{key: str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      ablate.ablate(config, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_memorization_study_reuses_the_pretraining_studys_dp_runs():
  """Its DP cells are the pretraining study's pretrained cells (same trainer configs, seeds and noise
  seeds), so the two tables can be read together; only the non-private runs train longer."""
  mem = load_config(str(ROOT / "configs/study_memorization.py:tiny"))
  pre = load_config(str(ROOT / "configs/study_pretraining.py:tiny"))
  runs = ablate.expand(mem)
  assert len(runs) == 9 and all(r.pretrained for r in runs)
  assert {r.target_epsilon for r in runs} == {1.0, 10.0, float("inf")}
  pretraining_runs = set(ablate.expand(pre))
  for run in runs:
    config = ablate.run_config(mem, run)
    if run.private:
      assert run in pretraining_runs
      assert config.to_dict() == ablate.run_config(pre, run).to_dict()
    else:
      assert config.train.steps == 1000 > ablate.run_config(pre, run).train.steps
