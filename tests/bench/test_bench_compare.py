"""`jaxldm bench compare`: jaxldm and the PyTorch/Opacus twin in one command, and its errors."""

import json

import pytest

from jaxldm import cli, hostmem
from jaxldm.bench import compare

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
