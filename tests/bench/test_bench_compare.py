"""`jaxldm bench compare`: jaxldm and the PyTorch/Opacus twin in one command, and its errors."""

import json

import pytest

from jaxldm import cli, hostmem
from jaxldm.bench import compare
from jaxldm.config import ConfigError

TINY_AE = ["--config.data.shape=(2,8,8)", "--config.model.channels=(4,8)"]


def test_missing_torch_is_one_line(monkeypatch, capsys):
  monkeypatch.setattr(compare, "torch_missing", lambda: ["opacus"])
  code = cli.main(["bench", "compare", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny", *TINY_AE])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "pip install -e '.[bench]'" in err and "opacus" in err


def test_needs_model_and_config_or_files(capsys):
  assert cli.main(["bench", "compare", "--model", "unet"]) == 2
  assert "--from-files" in capsys.readouterr().err


def test_ratios_from_records():
  mk = lambda mode, s: {"model": "unet", "batch": 8, "mode": mode, "step_s": s, "params": 10, "device_kind": "x"}
  jax_records = [mk("nonprivate", 1.0), mk("vmap", 1.1), mk("vmap_microbatch", 1.5)]
  torch_records = [mk("nonprivate", 0.5), mk("opacus_functorch", 2.0), mk("opacus_hooks", 1.65)]
  (row,) = compare.ratios(jax_records, torch_records)
  assert row["jaxldm_dp_mode"] == "vmap" and row["opacus_dp_mode"] == "opacus_hooks"
  assert row["opacus_dp_over_jaxldm_dp"] == pytest.approx(1.5)
  assert row["jaxldm_plain_over_torch_plain"] == pytest.approx(2.0)
  assert row["jaxldm_dp_over_jaxldm_plain"] == pytest.approx(1.1)
  assert row["opacus_dp_over_torch_plain"] == pytest.approx(3.3)


def test_one_command_runs_both(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("opacus")
  out = tmp_path / "compare.json"
  code = cli.main(["bench", "compare", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny",
                   *TINY_AE, "--batch", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                   "--threads", "1", "--json", str(out)])
  assert code == 0
  result = json.loads(out.read_text())
  assert {r["mode"] for r in result["jaxldm"]} == {"nonprivate", "vmap"}
  assert {r["mode"] for r in result["pytorch"]} == {"nonprivate", "opacus_functorch", "opacus_hooks"}
  (row,) = result["ratios"]
  assert row["jaxldm_params"] == row["torch_params"] > 0
  for key in ("opacus_dp_over_jaxldm_dp", "jaxldm_plain_over_torch_plain", "jaxldm_dp_over_jaxldm_plain"):
    assert row[key] > 0
  assert "jaxldm vs PyTorch/Opacus" in capsys.readouterr().out
  # Both sides ran under one host-memory setting (the twin inherits the environment), and the table says which.
  assert row["jaxldm_host_memory"] == row["torch_host_memory"] == hostmem.status()
  assert compare.ratio_table(result["ratios"]).caption.endswith(f"host memory: {hostmem.status()}")


def _row(opacus_dp, jax_dp, jax_plain=0.1, torch_plain=0.05, batch=8):
  jax_records = [{"model": "unet", "batch": batch, "mode": "nonprivate", "step_s": jax_plain, "params": 10,
                  "device_kind": "cpu"}, {"model": "unet", "batch": batch, "mode": "vmap", "step_s": jax_dp,
                                          "params": 10, "device_kind": "cpu"}]
  torch_records = [{"model": "unet", "batch": batch, "mode": "nonprivate", "step_s": torch_plain, "params": 10,
                    "device_kind": "cpu"}, {"model": "unet", "batch": batch, "mode": "opacus_hooks",
                                            "step_s": opacus_dp, "params": 10, "device_kind": "cpu"}]
  return jax_records, torch_records


def test_rounds_summary_is_the_median_ratio_with_its_range():
  rounds = [compare.ratios(*_row(opacus_dp, 0.2)) for opacus_dp in (0.30, 0.22, 0.26)]
  (row,) = compare.summarize(rounds)
  assert row["rounds"] == 3
  assert row["opacus_dp_over_jaxldm_dp"] == pytest.approx(1.3)  # Median of 1.5, 1.1, 1.3.
  assert row["opacus_dp_over_jaxldm_dp_range"] == pytest.approx([1.1, 1.5])
  assert row["jaxldm_dp_over_jaxldm_plain"] == pytest.approx(2.0)
  assert row["opacus_dp_s"] == pytest.approx(0.26)
  # A (model, batch) missing from one round is left out rather than summarised from fewer rounds.
  assert compare.summarize([compare.ratios(*_row(0.3, 0.2, batch=8)), compare.ratios(*_row(0.3, 0.2, batch=16))]) == []
  assert "median of 3 rounds" in compare.ratio_table([row]).caption


def test_rounds_alternate_which_side_goes_first(monkeypatch):
  calls = []

  def side(name):
    def run(*args, environ=None, **kwargs):
      calls.append((name, environ))
      return _row(0.3, 0.2)[0 if name == "jaxldm" else 1]
    return run

  monkeypatch.setattr(compare, "run_twin", side("pytorch"))
  monkeypatch.setattr(compare, "run_jaxldm", side("jaxldm"))
  result = compare.run("unet", "ldm:tiny", rounds=3)
  assert [c[0] for c in calls] == ["pytorch", "jaxldm", "jaxldm", "pytorch", "pytorch", "jaxldm"]
  assert all(environ == compare.rounds_environ() for _, environ in calls)  # One environment for both sides.
  assert [r["order"][0] for r in result["rounds"]] == ["pytorch", "jaxldm", "pytorch"]
  assert sorted({r["round"] for r in result["jaxldm"]}) == [0, 1, 2]
  assert result["ratios"][0]["rounds"] == 3
  with pytest.raises(ConfigError, match="--rounds 0"):
    compare.run("unet", "ldm:tiny", rounds=0)


def test_a_jaxldm_round_runs_in_a_fresh_process(tmp_path):
  """What `--rounds` runs for jaxldm: `jaxldm bench grads` in a subprocess, the records back, under the
  huge-page setting the command would choose (jaxldm/hostmem.py)."""
  environ = compare.rounds_environ()
  # One mode: the process start and the records' way back are what is tested (both modes: test above).
  records = compare.run_jaxldm("autoencoder", "configs/autoencoder.py:tiny", TINY_AE, batches=(2,),
                               modes=("vmap",), microbatch=0, repeats=1, warmup=0, environ=environ)
  assert {(r["mode"], r["batch"]) for r in records} == {("vmap", 2)}
  assert all(r["step_s"] > 0 for r in records)
  assert records[0]["host_memory"] == hostmem.status(environ)
  with pytest.raises(RuntimeError, match="jaxldm bench grads failed .exit 2.: .*model.channels. expects a tuple of integers"):
    compare.run_jaxldm("autoencoder", "configs/autoencoder.py:tiny", ["--config.model.channels=oops"], batches=(2,),
                       modes=("nonprivate",), microbatch=0, repeats=1, warmup=0)


def test_a_benchmark_stopped_at_its_time_limit_returns_what_it_wrote(tmp_path):
  """With keep_going, a subprocess benchmark killed at `timeout` gives back the records it saved before
  (`jaxldm bench gpu-check` bounds the PyTorch/Opacus twin this way); without, the timeout is raised."""
  import subprocess
  import sys

  out = tmp_path / "records.json"
  slow = [sys.executable, "-c", "import json, sys, time\n"
          "json.dump([{'batch': 2, 'mode': 'nonprivate'}], open(sys.argv[1], 'w'))\ntime.sleep(60)", str(out)]
  assert compare._records_from(slow, str(out), None, "slow", timeout=1.5, keep_going=True) == [
      {"batch": 2, "mode": "nonprivate"}]
  with pytest.raises(subprocess.TimeoutExpired):
    compare._records_from(slow, str(out), None, "slow", timeout=0.5)
