"""`jaxldm demo` with a miniature plan: every stage runs, the report has the keys, a re-run resumes."""

import json

import numpy as np
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
  assert report["privacy"]["noise_seed_provenance"] == "os-entropy"  # A real run, not a fixed test seed.
  assert (out / "report.md").is_file() and (out / "real_vs_synthetic.png").is_file()
  assert (out / "real_vs_synthetic_conditioned.png").is_file()
  summary = json.loads((out / demo.MODE_FILE).read_text())
  assert summary["public_models"] == "trained here" and summary["seconds"]["total"] > 0
  assert not any("skipping" in m for m in messages)

  markers = [out / p for p in ("autoencoder/autoencoder.json", "ssl/encoder.json", "ldm/run.json",
                               "ldm_dp/run.json")]
  mtimes = [m.stat().st_mtime_ns for m in markers]
  again_messages = []
  again = demo.run(out, "tiny", plan=plan, overrides=overrides, say=again_messages.append, from_scratch=True)
  assert sum("skipping" in m for m in again_messages) == 5  # Phantoms and the four training stages.
  assert [m.stat().st_mtime_ns for m in markers] == mtimes
  assert again["samples"]["how"] == "reused" and again["fid"] == pytest.approx(report["fid"])


def test_conditioning_sweep_figure(mini_demo):
  out, _, _, plan, _ = mini_demo
  from jaxldm.data.defaults import SIZES

  name = demo.conditioning_sweep(out / "ldm_dp", out / "phantoms/heldout", out, SIZES["tiny"][1],
                                 steps=plan.sample_steps, n=3)
  assert (out / name).is_file()
  rows = json.loads((out / "sweep/sweep.json").read_text())["rows"]
  assert [r["phase"] for r in rows] == [0, 0, 0, 1, 1, 1]
  lv = [r["conditioned_lv_ml"] for r in rows]
  assert lv[0] < lv[1] < lv[2] and lv[3] < lv[4] < lv[5]
  # The tiles share one noise: the same conditioning drawn across batches gives the same volume.
  from jaxldm.infer import generate

  sweep_csv = (out / "sweep/attributes.csv").read_text().splitlines()
  same = out / "same_rows.csv"
  same.write_text("\n".join([sweep_csv[0]] + [sweep_csv[1].replace("sweep-000", f"s{i}") for i in range(4)]) + "\n")
  v, _, _, _ = generate.generate(out / "ldm_dp", 4, num_steps=plan.sample_steps, csv_path=same, batch_size=2,
                                 shared_noise=True)
  np.testing.assert_array_equal(v[0], v[3])
  v_own, _, _, _ = generate.generate(out / "ldm_dp", 4, num_steps=plan.sample_steps, csv_path=same, batch_size=2)
  assert not np.allclose(v_own[0], v_own[1])  # Without it, each example its own noise.


def test_demo_refuses_another_mode_in_the_same_out(mini_demo):
  out, _, _, plan, overrides = mini_demo
  from jaxldm import pretrained

  if not pretrained.available("tiny"):
    pytest.skip("no shipped tiny models")
  with pytest.raises(demo.ConfigError, match="public models"):
    demo.run(out, "tiny", plan=plan, overrides=overrides, say=lambda _: None)


def test_unknown_size_is_a_user_error(tmp_path):
  with pytest.raises(demo.ConfigError, match="--size"):
    demo.run(tmp_path, "huge")
