"""`jaxldm bench trainer`: the LDM trainer's own jitted private step (Poisson batcher included) vs its
non-private step, on synthetic latents, with nothing left behind."""

import json
import pathlib
import tempfile

import pytest

from jaxldm import cli

# A small UNet (one level, no attention) on (2, 8, 8) volumes -> (2, 4, 4, 2) latents.
SMALL = ["--config.data.shape=(2,8,8)", "--config.model.base_channels=4", "--config.model.context_dim=8",
         "--config.model.channel_mult=(1,)", "--config.model.attention_levels=()",
         "--config.model.mid_attention=False", "--config.dp.microbatch_size=2"]


def test_trainer_steps_are_timed(tmp_path, capsys):
  before = set(pathlib.Path(tempfile.gettempdir()).glob("jaxldm_bench_trainer_*"))
  out = tmp_path / "trainer.json"
  code = cli.main(["bench", "trainer", "--config", "configs/ldm_dp.py:tiny", *SMALL, "--steps", "2",
                   "--warmup", "0", "--no-same-k", "--json", str(out)])
  assert code == 0
  r = json.loads(out.read_text())
  k = r["noise_multiplicity"]
  assert k == 2 and r["latent_shape"] == [2, 4, 4, 2]
  assert r["private_step_s"] > 0 and r["nonprivate_step_s"] > 0
  assert r["dp_over_k_nonprivate"] == pytest.approx(r["private_step_s"] / (k * r["nonprivate_step_s"]))
  assert len(r["times_s"]["private"]) == 2 and len(r["times_s"]["nonprivate"]) == 2
  assert "nonprivate_same_k" not in r["times_s"]
  # The batcher's static padded size is a multiple of microbatch x devices; real sizes vary.
  assert r["padded_batch"] % (r["microbatch_size"] * r["num_devices"]) == 0
  assert all(0 <= s <= r["padded_batch"] for s in r["sampled_batch_sizes"])
  # One size per TIMED step, and the rows each ran: its size padded up to a multiple of m x devices.
  m = r["microbatch_size"] * r["num_devices"]
  assert len(r["sampled_batch_sizes"]) == len(r["rows_computed"]) == 2
  assert all(rows % m == 0 and s <= rows < s + m or (s == 0 and rows == m)
             for s, rows in zip(r["sampled_batch_sizes"], r["rows_computed"]))
  # The ratio is of MEANS (a Poisson step's cost is a mixture over its sizes); medians ride along.
  assert r["statistic"] == "mean"
  assert r["private_step_s"] == pytest.approx(sum(r["times_s"]["private"]) / 2)
  assert r["median_step_s"]["private"] == pytest.approx(sorted(r["times_s"]["private"])[0] / 2
                                                        + sorted(r["times_s"]["private"])[1] / 2)
  assert r["nonprivate_batch"] % r["num_devices"] == 0
  assert set(pathlib.Path(tempfile.gettempdir()).glob("jaxldm_bench_trainer_*")) == before  # Temp workdir gone.
  assert "DP / (2 x nonprivate)" in capsys.readouterr().out


def test_trainer_needs_a_dp_config(capsys):
  assert cli.main(["bench", "trainer", "--config", "configs/ldm.py:tiny"]) == 2
  assert "dp.enabled is False" in capsys.readouterr().err
