"""The `jaxldm` command: help for every subcommand, phantoms + inspect, one-line errors."""

import hashlib
import json
import pathlib
import subprocess
import sys

import pytest

from jaxldm import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--shape", "6,24,24", "--spacing", "20,4.8,4.8"]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "jaxldm.cli", *args], capture_output=True, text=True, cwd=ROOT)


def _digest(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", [[], ["data"], ["data", "phantoms"], ["data", "inspect"],
                                     ["data", "prepare"], ["config"], ["demo"], ["train"], ["sample"],
                                     ["privacy"], ["privacy", "epsilon"], ["privacy", "calibrate"],
                                     ["privacy", "audit"]])
def test_every_command_has_help(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([*command, "--help"])
  assert exit_info.value.code == 0
  assert "usage: jaxldm" in capsys.readouterr().out


def test_phantoms_twice_identical_then_inspect(tmp_path, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  for out in (a, b):
    assert cli.main(["data", "phantoms", "--out", str(out), "--n", "4", "--domain", "private",
                     "--seed", "1", "--quiet", *TINY]) == 0
  assert _digest(a) == _digest(b)
  assert len(list(a.glob("*.nii.gz"))) == 4
  capsys.readouterr()
  report_path = tmp_path / "report.json"
  assert cli.main(["data", "inspect", str(a), "--json", str(report_path), "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "4 NIfTI file(s), 4 readable" in out
  assert "lv_edv_ml" in out
  report = json.loads(report_path.read_text())
  assert report["files"] == 4 and report["problems"] == []
  assert report["canonical_shapes"] == {"6x24x24": 4}
  assert report["attributes"]["columns"]["lv_edv_ml"]["coverage"] == 1.0
  assert report["spacing"][2]["median"] == pytest.approx(20.0)


def test_inspect_lists_problems_and_exits_nonzero(tmp_path, capsys):
  assert cli.main(["data", "phantoms", "--out", str(tmp_path / "d"), "--n", "2", "--quiet", *TINY]) == 0
  (tmp_path / "d" / "broken.nii.gz").write_bytes(b"not a nifti file at all")
  capsys.readouterr()
  assert cli.main(["data", "inspect", str(tmp_path / "d"), "--quiet"]) == 1
  out = capsys.readouterr().out
  assert "broken.nii.gz" in out
  assert "volume(s) with no CSV row: broken" in out


def test_prepare_fills_the_cache(tmp_path, capsys):
  data = tmp_path / "d"
  assert cli.main(["data", "phantoms", "--out", str(data), "--n", "3", "--quiet", *TINY]) == 0
  assert cli.main(["data", "prepare", "--config", str(ROOT / "configs/data.py:tiny"),
                   f"--config.data.root={data}", "--config.data.shape=4,16,16"]) == 0
  out = capsys.readouterr().out
  assert "3 volumes -> array (3, 4, 16, 16) float32" in out
  assert list((data / ".jaxldm_cache").rglob("*.npy"))


@pytest.mark.parametrize("args, message", [
    (["data", "inspect", "{tmp}/missing"], "is not a directory"),
    (["data", "inspect", "{tmp}"], "contains no .nii"),
    (["data", "prepare", "--config", "configs/data.py", "--config.data.rooot={tmp}"], "unknown config key 'data.rooot'"),
    (["data", "prepare", "--config", "configs/data.py", "--config.data.root={tmp}"], "{tmp}"),
    (["config", "--config", "configs/nope.py"], "configs/nope.py does not exist"),
])
def test_user_errors_are_one_line_and_nonzero(tmp_path, args, message, capsys, monkeypatch):
  # In-process: `cli.main` is what the command runs (`sys.exit(main())`); the test below runs a process.
  monkeypatch.chdir(ROOT)
  assert cli.main([a.format(tmp=tmp_path) for a in args]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxldm: error: "), lines
  assert message.format(tmp=tmp_path) in lines[0]


def test_the_command_exits_2_with_one_line_and_keeps_a_nonempty_output(tmp_path):
  (tmp_path / "keep.txt").write_text("precious")
  result = _run("data", "phantoms", "--out", str(tmp_path), "--n", "2", "--quiet", *TINY)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxldm: error: ") and str(tmp_path) in lines[0], result.stderr
  assert (tmp_path / "keep.txt").read_text() == "precious"


def test_privacy_epsilon_and_calibrate(capsys):
  assert cli.main(["privacy", "epsilon", "--noise-multiplier", "1.1", "--batch-size", "256",
                   "--dataset-size", "60000", "--steps", "14062", "--accountant", "both"]) == 0
  out = capsys.readouterr().out
  assert "epsilon = 2.5966  (RDP" in out and "epsilon = 2.3817  (PLD" in out  # Reference values (jaxldm/privacy/accounting.py).
  assert cli.main(["privacy", "calibrate", "--target-epsilon", "3", "--sampling-rate", "0.01",
                   "--steps", "500", "--accountant", "rdp"]) == 0
  out = capsys.readouterr().out
  sigma = float(out.split("noise multiplier = ")[1].split()[0])
  from jaxldm.privacy import accounting
  eps = accounting.epsilon(noise_multiplier=sigma, sampling_rate=0.01, steps=500, delta=1e-5, accountant="rdp")
  assert 0.99 * 3 <= eps <= 3.0 * 1.0001


def test_privacy_bad_input_is_one_line(capsys):
  assert cli.main(["privacy", "epsilon", "--noise-multiplier", "1", "--sampling-rate", "2", "--steps", "3"]) == 2
  assert "sampling_rate must be in (0, 1]" in capsys.readouterr().err
  assert cli.main(["privacy", "epsilon", "--noise-multiplier", "1", "--steps", "3"]) == 2
  assert "--sampling-rate" in capsys.readouterr().err


def test_privacy_ledger_prints_the_composed_epsilon(tmp_path, capsys):
  from jaxldm.privacy import accounting, ledger as ledger_lib

  upstream = [dict(stage="autoencoder_workdir", workdir="/runs/ae_dp", sampling_rate=0.125, noise_multiplier=1.0,
                   steps=100, delta=1e-5, accountant="rdp", epsilon=1.0)]
  ledger = ledger_lib.PrivacyLedger.load_or_create(
      str(tmp_path), sampling_rate=0.125, noise_multiplier=1.0, l2_clip_norm=1.0, delta=1e-5, dataset_size=64,
      accountant="rdp", pinned={"data.fingerprint": "ab" * 32}, upstream=upstream)
  ledger.record_steps(100)
  assert cli.main(["privacy", "ledger", "--workdir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  composed = accounting.composed_epsilon([dict(noise_multiplier=1.0, sampling_rate=0.125, steps=100)] * 2,
                                         delta=1e-5, accountant="rdp")
  assert f"composed epsilon {composed:.4f}" in out and "pinned data.fingerprint" in out
  assert composed > ledger.epsilon()
  assert cli.main(["privacy", "ledger", "--workdir", str(tmp_path / "nowhere")]) == 2


def test_privacy_epsilon_refuses_steps_and_epochs_together(capsys):
  assert cli.main(["privacy", "epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "3",
                   "--epochs", "2"]) == 2
  assert "not both" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Errors name what to type on the command line, not Python arguments.
# ---------------------------------------------------------------------------------------------
def _nifti(path, shape):
  import nibabel as nib
  import numpy as np
  data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 8.0, 1.0])), str(path))


def test_errors_name_the_cli_flag_or_config_key(tmp_path, capsys):
  cine = tmp_path / "cine"
  cine.mkdir()
  _nifti(cine / "sub-1.nii.gz", (16, 16, 4, 3))
  prepare = ["data", "prepare", "--config", str(ROOT / "configs/data.py:tiny"), "--config.data.attributes="]
  assert cli.main([*prepare, f"--config.data.root={cine}"]) == 2
  err = capsys.readouterr().err
  assert "sub-1.nii.gz" in err and "--config.data.frame=N" in err and "frame=..." not in err
  assert cli.main([*prepare, f"--config.data.root={cine}", "--config.data.frame=7"]) == 2
  assert "--config.data.frame=7 is out of range" in capsys.readouterr().err
  assert cli.main([*prepare, f"--config.data.root={cine}", "--config.data.frame=1"]) == 0
  capsys.readouterr()

  data = tmp_path / "d"
  assert cli.main(["data", "phantoms", "--out", str(data), "--n", "2", "--quiet", *TINY]) == 0
  (data / "attributes.csv").write_text((data / "attributes.csv").read_text().splitlines()[0] + "\n")
  assert cli.main(["data", "prepare", "--config", str(ROOT / "configs/data.py:tiny"), f"--config.data.root={data}"]) == 2
  err = capsys.readouterr().err
  assert "--config.data.strict_ids=false" in err and "strict_ids=False" not in err
  assert cli.main(["data", "phantoms", "--out", str(data), "--n", "2", "--quiet", *TINY]) == 2
  err = capsys.readouterr().err
  assert "--overwrite" in err and "overwrite=True" not in err


@pytest.mark.parametrize("args, flag", [
    (["calibrate", "--target-epsilon", "3", "--delta", "1"], "--delta 1: delta must be in (0, 1)"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "0"], "--delta 0: delta must be in (0, 1)"),
    (["calibrate", "--target-epsilon", "0"], "--target-epsilon: "),
    (["epsilon", "--noise-multiplier", "-1"], "--noise-multiplier: "),
])
def test_privacy_errors_name_the_flag(args, flag, capsys):
  assert cli.main(["privacy", *args, "--sampling-rate", "0.01", "--steps", "100"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"jaxldm: error: {flag}") and len(err.strip().splitlines()) == 1, err
  if "--delta" in flag:
    assert "epsilon" not in err.lower()


# ---------------------------------------------------------------------------------------------
# data inspect and data prepare read a dataset by the same rules.
# ---------------------------------------------------------------------------------------------
def _edit_csv(path, edit):
  import csv
  rows = list(csv.reader(path.open()))
  edit(rows)
  with path.open("w", newline="") as f:
    csv.writer(f).writerows(rows)


def test_inspect_and_prepare_agree_on_the_csv(tmp_path, capsys):
  data = tmp_path / "d"
  assert cli.main(["data", "phantoms", "--out", str(data), "--n", "3", "--quiet", *TINY]) == 0

  def edit(rows):
    rows[1][0] += ".nii.gz"  # An id given as the file name: the loader accepts it.
    rows[0] += ["site", "grade"]
    for i, row in enumerate(rows[1:]):
      row += ["AB"[i % 2], ["1", "x", "2.5"][i]]
  _edit_csv(data / "attributes.csv", edit)
  (data / "._resource_fork.nii").write_bytes(b"macOS metadata")  # Hidden: not a volume for the loader.
  capsys.readouterr()
  report_path = tmp_path / "report.json"
  assert cli.main(["data", "inspect", str(data), "--quiet", "--json", str(report_path)]) == 1
  report = json.loads(report_path.read_text())
  assert report["files"] == 3 and report["readable"] == 3
  assert len(report["problems"]) == 1, report["problems"]
  assert "row 3, column 'grade': value 'x' is not a number" in report["problems"][0]
  assert report["attributes"]["columns"]["site"]["counts"] == {"A": 2, "B": 1}
  assert report["hints"] == ["column 'site' is text; to condition on it, add '--config.data.categories=site=A|B'"]

  prepare = ["data", "prepare", "--config", str(ROOT / "configs/data.py:tiny"), f"--config.data.root={data}"]
  assert cli.main([*prepare, "--config.data.attributes=lv_ef,grade"]) == 2
  assert "row 3, column 'grade': value 'x' is not a number" in capsys.readouterr().err
  assert cli.main([*prepare, "--config.data.attributes=lv_ef,site"]) == 2
  assert "--config.data.categories=site=A|B|..." in capsys.readouterr().err
  assert cli.main([*prepare, "--config.data.attributes=lv_ef,site", "--config.data.categories=site=A|B"]) == 0
  assert "3 volumes" in capsys.readouterr().out


def test_prepare_lists_every_bad_volume_and_can_exclude_them(tmp_path, capsys):
  data = tmp_path / "d"
  assert cli.main(["data", "phantoms", "--out", str(data), "--n", "3", "--quiet", *TINY]) == 0
  (data / "bad-1.nii.gz").write_bytes(b"truncated")
  (data / "bad-2.nii").write_bytes(b"not nifti")
  _edit_csv(data / "attributes.csv", lambda rows: rows.extend([["bad-1"] + [""] * (len(rows[0]) - 1)]))
  prepare = ["data", "prepare", "--config", str(ROOT / "configs/data.py:tiny"), f"--config.data.root={data}",
             "--config.data.strict_ids=false"]
  capsys.readouterr()
  assert cli.main(prepare) == 2
  err = capsys.readouterr().err
  assert "bad-1.nii.gz" in err and "bad-2.nii" in err
  assert err.strip().splitlines()[-1].startswith("jaxldm: error: 2 of 5 volume(s)") and "--exclude-bad FILE" in err
  listing = tmp_path / "bad.txt"
  assert not listing.exists()
  assert cli.main([*prepare, "--exclude-bad", str(listing)]) == 0
  out = capsys.readouterr().out
  flat = "".join(out.split())  # Rich wraps long lines.
  assert f"--config.data.exclude={listing}" in flat and "3volumes->array(3,6,32,32)" in flat
  assert [line for line in listing.read_text().splitlines() if not line.startswith("#")] == ["bad-1", "bad-2"]
  # Training reads the list: strict ids too (bad-1's CSV row is ignored, not an unknown subject).
  from jaxldm.config import load_config
  from jaxldm.data.defaults import build_dataset
  config = load_config(str(ROOT / "configs/data.py:tiny"), [f"--config.data.root={data}",
                                                             f"--config.data.exclude={listing}"])
  assert build_dataset(config.data).subject_ids == [f"private-{i:05d}" for i in range(1, 4)]


def test_help_starts_without_jax_scipy_or_nibabel():
  """`jaxldm --help` (and every command's parsing) imports none of the heavy libraries: the data package
  loads its modules on first use (its `errors` pulled nibabel and scipy in: ~0.7 s of every command)."""
  code = ("import sys, contextlib, io\nfrom jaxldm import cli\n"
          "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
          "  try:\n    cli.main(['--help'])\n  except SystemExit:\n    pass\n"
          "assert 'train' in out.getvalue()\n"
          "print(sorted(m for m in ('jax', 'scipy', 'nibabel', 'flax', 'orbax') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"
