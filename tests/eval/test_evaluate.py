"""`jaxldm evaluate` end to end on tiny phantoms: keys, determinism, copies detected, user errors."""

import json
import pathlib

import numpy as np
import pytest

from jaxldm import cli
from jaxldm.config import load_config
from jaxldm.data import phantoms
from jaxldm.eval import evaluate
from jaxldm.privacy.ledger import PrivacyLedger
from jaxldm.train import autoencoder, generate, ldm, ssl

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPE, SPACING = (6, 32, 32), (20.0, 3.6, 3.6)
DATA = {"data.shape": SHAPE, "data.spacing": SPACING, "data.attributes": ("lv_edv_ml", "lv_esv_ml", "phase")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Tiny phantoms (train + held-out), a 1-step AE, LDM and SSL encoder."""
  root = tmp_path_factory.mktemp("evaluate")
  train, real = root / "train", root / "real"
  phantoms.write_dataset(train, 10, domain="private", shape=SHAPE, spacing=SPACING, seed=0, progress=False)
  phantoms.write_dataset(real, 8, domain="private", shape=SHAPE, spacing=SPACING, seed=1, progress=False)
  one_step = {"train.steps": 1, "train.batch_size": 4, "train.log_every": 1, "train.checkpoint_every": 1}
  autoencoder.train_and_evaluate(load_config(str(ROOT / "configs/autoencoder.py:tiny"), {
      **DATA, **one_step, "data.root": str(train), "train.sample_every": 0}), root / "ae")
  ldm.train_and_evaluate(load_config(str(ROOT / "configs/ldm.py:tiny"), {
      **DATA, **one_step, "data.root": str(train), "autoencoder_workdir": str(root / "ae"),
      "model.base_channels": 8, "model.context_dim": 8, "train.sample_every": 0}), root / "ldm")
  ssl.train_and_evaluate(load_config(str(ROOT / "configs/ssl.py:tiny"), {
      **DATA, **one_step, "data.root": str(train), "train.batch_size": 8, "train.num_devices": 1}), root / "ssl")
  return root


def _evaluate(run, out, *extra):
  return cli.main(["evaluate", "--workdir", str(run / "ldm"), "--real", str(run / "real"), "--out", str(out),
                   "--n", "4", "--steps", "2", "--batch-size", "4", "--feature-weights", str(run / "ssl"), *extra])


def test_report_has_every_section_and_reruns_identically(run, tmp_path, capsys):
  out = tmp_path / "eval"
  assert _evaluate(run, out) == 0
  report = json.loads((out / "report.json").read_text())
  for key in ("epsilon", "delta", "fid", "kid", "copy_rate", "controllability", "rero_bound"):
    assert key in report
  assert report["epsilon"] == float("inf") and report["rero_bound"] is None  # Non-private run.
  assert np.isfinite(report["fid"]) and report["fid"] >= 0
  assert 0 <= report["copy_rate"] <= 1 and report["samples"]["n"] == 4
  assert report["extractor"]["name"] == "ssl3d" and report["quality"]["extractor"] == "ssl3d"
  # Phantom data: phantoms.measure against the conditioned LV volume (ED or ES by phase) and phase.
  section = report["controllability_details"]
  assert section["source"] == "phantoms.measure" and section["n"] == 4
  assert set(report["controllability"]) == {"lv_volume_ml"}
  assert "phase" in section["categorical"] or section["attributes"]["lv_volume_ml"]["n_nan_predicted"] > 0
  md = (out / "report.md").read_text()
  assert "FID (ssl3d)" in md and "do not release" in md
  for fig in report["figures"]:
    assert (out / fig).stat().st_size > 1000
  assert "wrote" in capsys.readouterr().out

  # A second run reuses the samples and the cached real features and gives the same numbers.
  assert _evaluate(run, out) == 0
  again = json.loads((out / "report.json").read_text())
  assert again["samples"]["how"] == "reused"
  for key in ("fid", "kid", "copy_rate", "safeguard_rejected_fraction"):
    assert again[key] == report[key]


def test_copies_of_training_volumes_are_flagged(run, tmp_path):
  """Samples that ARE training volumes: every one is a copy and the safeguard rejects them all."""
  train = generate.training_volumes(run / "ldm")
  samples = generate.write_volumes(tmp_path / "copies", train[:6], SPACING)
  report = evaluate.evaluate(run / "ldm", run / "real", tmp_path / "eval",
                             evaluate.Options(samples=str(samples), feature_weights=str(run / "ssl"),
                                              batch_size=4, training_images=False))
  assert report["copy_rate"] == 1.0
  assert report["memorization"]["max_correlation"] == pytest.approx(1.0, abs=1e-5)
  assert report["safeguard"]["rejected"] == 6
  assert "nearest_neighbours.png" not in report["figures"]


def test_privacy_section_reads_the_ledger(tmp_path):
  ledger = PrivacyLedger.load_or_create(str(tmp_path), sampling_rate=0.1, noise_multiplier=1.2, l2_clip_norm=1.0,
                                        delta=1e-5, dataset_size=80, accountant="rdp", target_epsilon=10.0)
  eps = ledger.record_steps(50)
  section = evaluate.privacy_section(tmp_path, (0.01,))
  assert section["private"] and section["epsilon"] == pytest.approx(eps) and section["steps"] == 50
  assert 0.01 < section["rero"]["bounds"][0] < 1


def test_user_errors(run, tmp_path, capsys):
  code = cli.main(["evaluate", "--workdir", str(run / "ldm"), "--real", str(run / "train"), "--out",
                   str(tmp_path / "x"), "--feature-weights", str(run / "ssl")])
  assert code == 2 and "training data" in capsys.readouterr().err
  code = cli.main(["evaluate", "--workdir", str(tmp_path / "nope"), "--real", str(run / "real")])
  assert code == 2 and "not an LDM run" in capsys.readouterr().err
