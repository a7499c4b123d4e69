"""`jaxldm privacy rero`: numbers from flags or a run's ledger, the plot, one-line errors."""

import pathlib
import re
import subprocess
import sys

import pytest

from jaxldm import cli
from jaxldm.privacy import reconstruction
from jaxldm.privacy.ledger import PrivacyLedger

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "jaxldm.cli", "privacy", "rero", *args],
                        capture_output=True, text=True, cwd=ROOT)


def _bounds(stdout: str) -> dict[float, float]:
  return {float(k): float(b) for k, b in
          re.findall(r"kappa (\S+)\s+-> attack success <= (\S+)", stdout)}


def test_flags_print_bounds_method_and_epsilon(capsys):
  assert cli.main(["privacy", "rero", "--noise-multiplier", "1.5", "--sampling-rate", "0.02", "--steps", "200",
                   "--kappa", "0.01,0.1"]) == 0
  out = capsys.readouterr().out
  assert "PLD" in out and "sigma 1.5, q 0.02, 200 steps [flags]" in out
  bounds = _bounds(out)
  expected = reconstruction.rero_bound(noise_multiplier=1.5, sampling_rate=0.02, steps=200,
                                       kappa=[0.01, 0.1])
  assert bounds == {0.01: pytest.approx(expected[0], abs=1e-4),
                    0.1: pytest.approx(expected[1], abs=1e-4)}
  assert 0.01 < bounds[0.01] < bounds[0.1] < 1.0
  assert re.search(r"epsilon = \d+\.\d+ at delta 1e-05", out)


def test_plot_is_written_atomically(tmp_path, capsys):
  plot = tmp_path / "figs" / "rero.png"
  # One full-batch step (each sigma's epsilon one Gaussian PLD, not 50 compositions: ~6 s less); the curve
  # at realistic q and T is tests/privacy/test_reconstruction.py's.
  assert cli.main(["privacy", "rero", "--noise-multiplier", "1.5", "--sampling-rate", "1", "--steps", "1",
                   "--method", "exact", "--kappa", "0.01,0.1", "--plot", str(plot)]) == 0
  assert f"wrote {plot}" in capsys.readouterr().out
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in plot.parent.iterdir()] == ["rero.png"]  # No temporary files left.


def test_exact_method_and_its_refusal(capsys):
  r = _run("--noise-multiplier", "2", "--sampling-rate", "1", "--steps", "1", "--kappa", "0.5",
           "--method", "exact")
  assert r.returncode == 0, r.stderr
  assert "exact closed form" in r.stdout
  assert _bounds(r.stdout)[0.5] == pytest.approx(0.6915, abs=1e-4)  # Phi(1/2).
  assert cli.main(["privacy", "rero", "--noise-multiplier", "2", "--sampling-rate", "0.1",
                   "--steps", "1", "--method", "exact"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxldm: error: ") and "pld" in err and len(err.strip().splitlines()) == 1


def test_workdir_reads_the_ledger(tmp_path, capsys):
  ledger = PrivacyLedger.load_or_create(str(tmp_path), sampling_rate=0.05, noise_multiplier=2.0,
                                        l2_clip_norm=1.0, delta=1e-6, dataset_size=10000)
  ledger.record_steps(40)
  assert cli.main(["privacy", "rero", "--workdir", str(tmp_path), "--kappa", "0.1"]) == 0
  out = capsys.readouterr().out
  assert "sigma 2, q 0.05, 40 steps" in out and "privacy_ledger.json" in out
  assert "at delta 1e-06" in out
  expected = reconstruction.rero_bound(noise_multiplier=2.0, sampling_rate=0.05, steps=40,
                                       kappa=0.1)
  assert _bounds(out)[0.1] == pytest.approx(expected, abs=1e-4)
  # Flags that would contradict the ledger are refused, not silently ignored.
  assert cli.main(["privacy", "rero", "--workdir", str(tmp_path), "--steps", "100"]) == 2
  err = capsys.readouterr().err
  assert "--steps" in err and "ledger" in err


def test_missing_inputs_are_one_line_errors(tmp_path, capsys):
  # In-process (cli.main is what the subprocess runs): four interpreter starts would cost ~20 s.
  for args, needle in ((("--sampling-rate", "0.1", "--steps", "5"), "--noise-multiplier"),
                       (("--workdir", str(tmp_path)), "privacy_ledger.json"),
                       (("--noise-multiplier", "1", "--sampling-rate", "0.1"), "--steps"),
                       (("--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "5",
                         "--kappa", "2"), "kappa")):
    assert cli.main(["privacy", "rero", *args]) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("jaxldm: error: ") and needle in err
    assert len(err.strip().splitlines()) == 1


def test_help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["privacy", "rero", "--help"])
  out = capsys.readouterr().out
  assert exit_info.value.code == 0 and "--kappa" in out and "--workdir" in out
