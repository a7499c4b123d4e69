"""`jaxldm demo` with a miniature plan: every stage runs, the report has the keys, a re-run resumes."""

import json

import pytest

from jaxldm import demo

MINI = demo.Plan(n_public=8, n_private=8, n_heldout=6, n_samples=4, autoencoder_steps=2, ssl_steps=1,
                 ldm_steps=2, dp_steps=2, sample_steps=2)
SMALL_LDM = {"model.base_channels": 8, "model.context_dim": 8, "train.sample_every": 0, "train.batch_size": 4}
OVERRIDES = {
    "autoencoder": {"train.sample_every": 0, "train.batch_size": 4},
    "ssl": {"train.batch_size": 8, "train.num_devices": 1},
    "ldm": SMALL_LDM,
    "ldm_dp": {**SMALL_LDM, "dp.expected_batch_size": 4, "dp.microbatch_size": 4},
}


def test_demo_runs_every_stage_and_resumes(tmp_path):
  messages = []
  report = demo.run(tmp_path, "tiny", plan=MINI, overrides=OVERRIDES, say=messages.append)
  on_disk = json.loads((tmp_path / "report.json").read_text())
  for key in ("epsilon", "delta", "fid", "kid", "copy_rate", "controllability", "rero_bound"):
    assert key in on_disk
  assert 0 < on_disk["epsilon"] <= 10 and on_disk["delta"] == 1e-5
  assert on_disk["rero_bound"] and all(0 < b <= 1 for b in on_disk["rero_bound"].values())
  assert report["privacy"]["noise_seed_provenance"] != "fixed_seed"  # A real run: OS entropy.
  assert (tmp_path / "report.md").is_file() and (tmp_path / "real_vs_synthetic.png").is_file()
  assert not any("skipping" in m for m in messages)

  markers = [tmp_path / p for p in ("autoencoder/autoencoder.json", "ssl/encoder.json", "ldm/run.json",
                                    "ldm_dp/run.json")]
  mtimes = [m.stat().st_mtime_ns for m in markers]
  messages.clear()
  again = demo.run(tmp_path, "tiny", plan=MINI, overrides=OVERRIDES, say=messages.append)
  assert sum("skipping" in m for m in messages) == 5  # Phantoms and the four training stages.
  assert [m.stat().st_mtime_ns for m in markers] == mtimes
  assert again["samples"]["how"] == "reused" and again["fid"] == pytest.approx(report["fid"])


def test_unknown_size_is_a_user_error(tmp_path):
  with pytest.raises(demo.ConfigError, match="--size"):
    demo.run(tmp_path, "huge")
