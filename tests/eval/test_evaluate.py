"""`jaxldm evaluate` end to end on tiny phantoms: keys, determinism, copies detected, user errors."""

import json

import numpy as np
import pytest

from jaxldm import cli
from jaxldm.eval import evaluate, sections
from jaxldm.privacy.ledger import PrivacyLedger
from jaxldm.infer import generate

pytestmark = pytest.mark.xdist_group(name="pipeline")  # Shares the mini_demo fixture with test_demo.py.
SPACING = (20.0, 3.6, 3.6)


@pytest.fixture(scope="module")
def run(mini_demo):
  """The miniature demo's directories: phantoms/{public,private,heldout}, autoencoder, ssl, ldm, ldm_dp.

  `ldm` (non-private) was trained on phantoms/public; phantoms/heldout is never trained on.
  """
  return mini_demo[0]


def _evaluate(run, out, *extra):
  return cli.main(["evaluate", "--workdir", str(run / "ldm"), "--real", str(run / "phantoms/heldout"),
                   "--out", str(out), "--n", "4", "--steps", "2", "--batch-size", "4", "--feature-weights",
                   str(run / "ssl"), *extra])


def test_report_has_every_section_and_reruns_identically(run, tmp_path, capsys):
  out = tmp_path / "eval"
  assert _evaluate(run, out) == 0
  report = json.loads((out / "report.json").read_text())
  for key in ("epsilon", "delta", "fid", "kid", "copy_rate", "controllability", "rero_bound"):
    assert key in report
  assert report["epsilon"] == float("inf") and report["rero_bound"] is None  # Non-private run.
  assert np.isfinite(report["fid"]) and report["fid"] >= 0
  assert 0 <= report["copy_rate"] <= 1 and report["samples"]["n"] == 4
  # No --guidance: drawn as `jaxldm sample --workdir` draws, with the run's sampling.guidance_scale.
  run_config = json.loads((run / "ldm" / "config.json").read_text())
  assert report["samples"]["guidance"] == run_config["sampling"]["guidance_scale"]
  # Latent-space memorization reads the sampler's own latents, saved next to the samples.
  latent = report["latent_memorization"]
  assert latent["latents"] == "sampler" and 0 <= report["latent_copy_rate"] <= 1
  assert np.load(out / "samples" / evaluate.LATENTS_FILE).shape[0] == 4
  assert 0 <= report["memorization"]["autoencoder_ceiling"] <= 1
  assert report["extractor"]["name"] == "ssl3d" and report["quality"]["extractor"] == "ssl3d"
  # Phantom data: phantoms.measure against the conditioned LV volume (ED or ES by phase) and phase.
  section = report["controllability_details"]
  assert section["source"] == "phantoms.measure" and section["n"] == 4
  assert "lv_volume_ml" in report["controllability"]
  assert set(report["controllability"]) <= {"lv_volume_ml", "rv_volume_ml", "myo_thickness_mm"}
  assert "phase" in section["categorical"] or section["attributes"]["lv_volume_ml"]["n_nan_predicted"] > 0
  md = (out / "report.md").read_text()
  assert "FID (ssl3d)" in md and "do not release" in md
  _check_release_labels(report, out)
  assert report["covered_by_dp"] == [] and "samples/" in report["data_owner_only"]  # Non-private run.
  for fig in report["figures"]:
    assert (out / fig).stat().st_size > 1000
  assert "wrote" in capsys.readouterr().out

  # A second run reuses the samples and the cached real features and gives the same numbers.
  assert _evaluate(run, out) == 0
  again = json.loads((out / "report.json").read_text())
  assert again["samples"]["how"] == "reused"
  for key in ("fid", "kid", "copy_rate", "latent_copy_rate", "safeguard_rejected_fraction"):
    assert again[key] == report[key]


# Every number the report computes from the training data outside DP, and its label in report.md.
OWNER_NUMBERS = {"copy_rate": "copy rate (synthetic that are copies)", "train_copied_rate": "training volumes copied",
                 "latent_copy_rate": "latent copy rate", "safeguard_rejected_fraction": "safeguard would reject",
                 "memorization": "tau =", "latent_memorization": "Latent space", "safeguard": "RMSE threshold"}


def _resolve(report, out, entry):
  """True when a release-label entry names something the report or OUT holds."""
  if "/" in entry or entry.endswith((".png", ".csv", ".npy")):
    return (out / entry).exists()
  section, _, key = entry.partition(".")
  return section in report and (not key or key in report[section])


def _check_release_labels(report, out):
  """JSON lists every data-owner-only number; report.md shows them only under the data owner's heading."""
  lists = {k: report[k] for k in ("covered_by_dp", "heldout_reference", "data_owner_only")}
  assert set(report["release_notes"]) == set(lists)
  for entries in lists.values():
    assert all(_resolve(report, out, e) for e in entries), entries
  owner = set(lists["data_owner_only"])
  released = set(lists["covered_by_dp"]) | set(lists["heldout_reference"])
  assert not owner & released
  # Nothing released contains a data-owner-only entry (e.g. "privacy" would contain privacy.dataset_size).
  assert not any(o.startswith(r + ".") or o.startswith(r + "/") for o in owner for r in released)
  assert set(OWNER_NUMBERS) <= owner and set(report["figures"]) <= owner
  private = report["privacy"]["private"]
  assert ("privacy.dataset_size" in owner) == private and ("privacy.epsilon" in lists["covered_by_dp"]) == private
  assert set(report["controllability_details"].get("source") == "phantoms.measure" and
             ["controllability", "controllability_details"] or []) <= set(lists["heldout_reference"])

  md = (out / "report.md").read_text()
  assert md.count(evaluate.OWNER_HEADING) == 1 and md.count(evaluate.RELEASED_HEADING) == 1
  before, after = md.split(evaluate.OWNER_HEADING)
  assert before.index(evaluate.RELEASED_HEADING) < before.index(evaluate.HELDOUT_HEADING)
  for label in OWNER_NUMBERS.values():
    assert label in after and label not in before, label
  for word in ("copy", "copied", "safeguard", "tau", "nearest", "training set size", ".png"):
    assert word not in before.lower(), word
  assert f"| copy rate (synthetic that are copies) | {sections.fmt(report['copy_rate'])} |" in after
  for fig in report["figures"]:
    assert f"({fig})" in after
  n_train = report["memorization"]["n_train"]
  assert f"| training set size | {n_train} |" in after
  if private:  # The memorization check compared the samples with the very data the DP run trained on.
    assert n_train == report["privacy"]["dataset_size"]
  if private:
    assert f"epsilon {sections.fmt(report['epsilon'])} at delta" in before and "noise seed: os-entropy" in before
    assert "N " + str(n_train) not in before
  # The printed summary labels the same numbers.
  printed = evaluate.summary(report)
  assert printed.index("for the data owner only") < printed.index("copy rate")
  assert "copy rate" not in printed.split("for the data owner only")[0]


def test_dp_run_report_separates_what_dp_covers(mini_demo):
  """The demo's report (the DP run, evaluated against held-out private phantoms)."""
  out = mini_demo[0]
  report = json.loads((out / "report.json").read_text())
  _check_release_labels(report, out)
  assert {"epsilon", "delta", "rero_bound", "samples/", "privacy.noise_multiplier"} <= set(report["covered_by_dp"])


def test_copies_of_training_volumes_are_flagged(run, tmp_path):
  """Samples that ARE training volumes: every one is a copy and the safeguard rejects them all."""
  train = generate.training_volumes(run / "ldm")
  samples = generate.write_volumes(tmp_path / "copies", train[:6], SPACING)
  report = evaluate.evaluate(run / "ldm", run / "phantoms/heldout", tmp_path / "eval",
                             evaluate.Options(samples=str(samples), feature_weights=str(run / "ssl"),
                                              batch_size=4, training_images=False))
  assert report["copy_rate"] == 1.0
  assert report["memorization"]["max_correlation"] == pytest.approx(1.0, abs=1e-5)
  assert report["safeguard"]["rejected"] == 6
  assert "nearest_neighbours.png" not in report["figures"]
  # No latents.npy with these samples: re-encoded, which for exact training volumes gives back the
  # training latents themselves.
  assert report["latent_memorization"]["latents"].startswith("re-encoded")
  assert report["latent_copy_rate"] == 1.0


def test_guidance_defaults_to_the_runs(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"sampling": {"guidance_scale": 2.5, "num_steps": 20}}))
  assert evaluate.with_run_defaults(tmp_path, evaluate.Options()).guidance == 2.5
  assert evaluate.with_run_defaults(tmp_path, evaluate.Options(guidance=0.0)).guidance == 0.0  # Given: kept.
  (tmp_path / "config.json").write_text(json.dumps({}))  # A run recorded without a sampling group.
  assert evaluate.with_run_defaults(tmp_path, evaluate.Options()).guidance == 1.0


def test_latent_memorization_flags_copied_latents_only():
  rng = np.random.default_rng(0)
  train, val = rng.normal(size=(16, 2, 4, 4, 2)), rng.normal(size=(16, 2, 4, 4, 2))
  copies = train[:8] + 0.05 * rng.normal(size=(8, 2, 4, 4, 2))
  fresh = rng.normal(size=(8, 2, 4, 4, 2))
  got = evaluate.latent_memorization(train, val, np.concatenate([copies, fresh]), "sampler")
  assert got["synthetic_copy_rate"] == 0.5 and got["train_copied_rate"] == 0.5
  assert got["max_correlation"] > 0.99 and got["tau"] < 0.9
  assert evaluate.latent_memorization(train, val, fresh, "sampler")["synthetic_copy_rate"] <= 1 / 8


def test_memorization_reports_the_autoencoder_ceiling(tmp_path):
  rng = np.random.default_rng(1)
  train_f, val_f = rng.normal(size=(12, 16)), rng.normal(size=(12, 16))
  syn_f = rng.normal(size=(6, 16))
  args = (train_f, val_f, syn_f, None, None, tmp_path, False)
  # Reconstructions as good as the originals: the criterion can see every copy, no warning.
  perfect = sections.memorization(*args, ceiling_f=train_f)
  assert perfect["autoencoder_ceiling"] == 1.0 and "warning" not in perfect
  # Reconstructions unrelated to their originals: a memorizing LDM would be invisible; say so.
  blurred = sections.memorization(*args, ceiling_f=rng.normal(size=(12, 16)))
  assert blurred["autoencoder_ceiling"] <= 0.25 and "latent-space copy rate" in blurred["warning"]


def test_privacy_section_reads_the_ledger(tmp_path):
  ledger = PrivacyLedger.load_or_create(str(tmp_path), sampling_rate=0.1, noise_multiplier=1.2, l2_clip_norm=1.0,
                                        delta=1e-5, dataset_size=80, accountant="rdp", target_epsilon=10.0)
  eps = ledger.record_steps(50)
  section = sections.privacy_section(tmp_path, (0.01,))
  assert section["private"] and section["epsilon"] == pytest.approx(eps) and section["steps"] == 50
  assert 0.01 < section["rero"]["bounds"][0] < 1


def test_user_errors(run, tmp_path, capsys):
  code = cli.main(["evaluate", "--workdir", str(run / "ldm"), "--real", str(run / "phantoms/public"), "--out",
                   str(tmp_path / "x"), "--feature-weights", str(run / "ssl")])
  assert code == 2 and "training data" in capsys.readouterr().err
  code = cli.main(["evaluate", "--workdir", str(tmp_path / "nope"), "--real", str(run / "phantoms/heldout")])
  assert code == 2 and "not an LDM run" in capsys.readouterr().err


def test_privacy_section_gives_the_composed_epsilon_of_the_stages(tmp_path):
  from jaxldm.privacy import accounting, ledger as ledger_lib

  upstream = [dict(stage="autoencoder_workdir", workdir="/runs/ae_dp", sampling_rate=0.125, noise_multiplier=1.0,
                   steps=100, delta=1e-5, accountant="rdp", epsilon=9.9)]
  ledger = ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), sampling_rate=0.125, noise_multiplier=1.0,
                                                   l2_clip_norm=1.0, delta=1e-5, dataset_size=64, accountant="rdp",
                                                   upstream=upstream)
  ledger.record_steps(100)
  p = sections.privacy_section(tmp_path, (0.01,))
  expected = accounting.composed_epsilon([dict(noise_multiplier=1.0, sampling_rate=0.125, steps=100)] * 2,
                                         delta=1e-5, accountant="rdp")
  assert p["composed_epsilon"] == pytest.approx(expected) and p["composed_epsilon"] > p["epsilon"]
  text = "\n".join(sections.privacy_lines(p))
  assert "Composed epsilon of the pipeline" in text and "autoencoder_workdir" in text
