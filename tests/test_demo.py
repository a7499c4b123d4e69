"""`jaxldm demo` with a miniature plan: every stage runs, the report has the keys, a re-run resumes."""

import json

import pytest

from jaxldm import demo

pytestmark = pytest.mark.xdist_group(name="pipeline")  # Shares the mini_demo fixture with test_evaluate.py.


def test_demo_runs_every_stage_and_resumes(mini_demo):
  out, report, messages, plan, overrides = mini_demo
  on_disk = json.loads((out / "report.json").read_text())
  for key in ("epsilon", "delta", "fid", "kid", "copy_rate", "controllability", "rero_bound"):
    assert key in on_disk
  assert 0 < on_disk["epsilon"] <= 10 and on_disk["delta"] == 1e-5
  assert on_disk["rero_bound"] and all(0 < b <= 1 for b in on_disk["rero_bound"].values())
  assert report["privacy"]["noise_seed_provenance"] != "fixed_seed"  # A real run: OS entropy.
  assert (out / "report.md").is_file() and (out / "real_vs_synthetic.png").is_file()
  assert not any("skipping" in m for m in messages)

  markers = [out / p for p in ("autoencoder/autoencoder.json", "ssl/encoder.json", "ldm/run.json",
                               "ldm_dp/run.json")]
  mtimes = [m.stat().st_mtime_ns for m in markers]
  again_messages = []
  again = demo.run(out, "tiny", plan=plan, overrides=overrides, say=again_messages.append)
  assert sum("skipping" in m for m in again_messages) == 5  # Phantoms and the four training stages.
  assert [m.stat().st_mtime_ns for m in markers] == mtimes
  assert again["samples"]["how"] == "reused" and again["fid"] == pytest.approx(report["fid"])


def test_unknown_size_is_a_user_error(tmp_path):
  with pytest.raises(demo.ConfigError, match="--size"):
    demo.run(tmp_path, "huge")
