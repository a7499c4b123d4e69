"""The release safeguard while sampling: no released volume lies within the threshold of training data."""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from jaxldm import cli
from jaxldm.config import load_config
from jaxldm.eval import safeguard
from jaxldm.infer import generate
from jaxldm.train import autoencoder, ldm

DATA = {"data.attributes": (), "data.shape": (4, 16, 16), "data.spacing": (20.0, 4.0, 4.0)}


# --------------------------------------------------------------------------------------------------
# The sampling loop with an injected generator (fast, exact control over copies).
# --------------------------------------------------------------------------------------------------


def _train(n=12, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 3, 5, 5)).astype(np.float32)


def _copying_sampler(train, copy_slots, *, copy_rounds=1, noise=1e-3):
  """Slot s in `copy_slots` is a near-copy of training volume s during the first `copy_rounds`."""
  calls = []

  def sample_fn(slots, round_index):
    calls.append((slots.copy(), round_index))
    rng = np.random.default_rng(1000 + round_index)
    out = rng.normal(size=(len(slots), *train.shape[1:])).astype(np.float32)
    for i, s in enumerate(slots):
      if s in copy_slots and round_index < copy_rounds:
        out[i] = train[s % len(train)] + noise * rng.normal(size=train.shape[1:])
    return out

  return sample_fn, calls


def test_nearest_neighbour_distances_and_percentile_threshold():
  train = _train()
  nn = safeguard.nearest_neighbour_distances(train)
  full = safeguard.distances(train, train)
  np.fill_diagonal(full, np.inf)
  np.testing.assert_allclose(nn, full.min(axis=1), rtol=1e-12)
  assert safeguard.percentile_threshold(train, percentile=50) == pytest.approx(np.median(nn))
  assert safeguard.percentile_threshold(train) == pytest.approx(np.percentile(nn, 5))
  with pytest.raises(ValueError, match="duplicate"):
    safeguard.percentile_threshold(np.concatenate([train, train[:1]]), percentile=1)
  with pytest.raises(ValueError, match="percentile"):
    safeguard.percentile_threshold(train, percentile=0)


def test_copies_are_redrawn_and_nothing_released_is_within_the_threshold():
  train = _train()
  threshold = safeguard.percentile_threshold(train)
  sample_fn, calls = _copying_sampler(train, copy_slots={0, 2, 3})
  result = safeguard.sample_with_safeguard(sample_fn, 6, train, threshold)
  assert result.complete and result.requested == 6
  assert list(result.slots) == list(range(6))
  assert result.rejected == 3 and result.rounds == 2
  # Round 2 redraws only the three rejected slots, twice each (release rate 1/2 in round 1).
  assert list(calls[1][0]) == [0, 0, 2, 2, 3, 3] and calls[1][1] == 1
  assert result.candidates == 6 + 6
  d = safeguard.distances(result.volumes, train)
  assert np.all(d > threshold)
  np.testing.assert_allclose(result.min_distances, d.min(axis=1))


def test_gives_up_after_max_rounds_and_says_so():
  train = _train()
  sample_fn, calls = _copying_sampler(train, copy_slots={1, 4}, copy_rounds=99)
  result = safeguard.sample_with_safeguard(sample_fn, 5, train, 0.5, max_rounds=3, max_oversample=4)
  assert not result.complete and result.rounds == 3 == len(calls)
  assert sorted(result.slots) == [0, 2, 3]
  assert result.rejected == result.candidates - 3 and result.volumes.shape == (3, 3, 5, 5)
  assert np.all(safeguard.distances(result.volumes, train) > 0.5)
  assert all(len(slots) <= 2 * 4 for slots, r in calls[1:])  # Oversampling is capped.


def test_embedding_features_are_compared_not_volumes():
  train = _train()
  features_fn = lambda v: v.reshape(len(v), -1)[:, :20]
  reference = features_fn(train)
  sample_fn, _ = _copying_sampler(train, copy_slots={1})
  result = safeguard.sample_with_safeguard(sample_fn, 3, reference, 0.05, metric="embedding",
                                           features_fn=features_fn)
  assert result.complete and result.rejected >= 1
  assert result.volumes.shape == (3, 3, 5, 5)  # Volumes are released, features only compared.
  assert np.all(safeguard.distances(features_fn(result.volumes), reference, metric="embedding") > 0.05)


# --------------------------------------------------------------------------------------------------
# A real tiny LDM through `jaxldm sample --safeguard`.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ldm_dir(tiny_nifti_dir, tmp_path_factory):
  ae = tmp_path_factory.mktemp("sg_ae")
  config = load_config("autoencoder:tiny",
                       {**DATA, "data.root": str(tiny_nifti_dir), "train.steps": 1, "train.batch_size": 4})
  autoencoder.train_and_evaluate(config, ae)
  workdir = tmp_path_factory.mktemp("sg_ldm")
  config = load_config("ldm:tiny", {
      **DATA, "data.root": str(tiny_nifti_dir), "autoencoder_workdir": str(ae),
      "model.base_channels": 8, "model.context_dim": 8, "model.attention_levels": (), "sampling.num_steps": 2, "train.log_every": 1,
      "train.sample_every": 0, "train.checkpoint_every": 1, "train.steps": 1, "train.batch_size": 4})
  ldm.train_and_evaluate(config, workdir)
  return workdir


def _sample(workdir, out, *extra):
  return cli.main(["sample", "--workdir", str(workdir), "--out", str(out), "--n", "3", "--steps", "2",
                   "--batch-size", "2", "--seed", "3", "--safeguard", *extra])


def _released(out: pathlib.Path) -> np.ndarray:
  files = sorted(out.glob("sample-*.nii.gz"))
  return np.stack([np.asarray(nib.load(f).dataobj).transpose(2, 1, 0) for f in files]) if files else np.zeros((0,))


def test_sample_safeguard_end_to_end(ldm_dir, tiny_nifti_dir, tmp_path, capsys):
  train = generate.training_volumes(ldm_dir, tiny_nifti_dir)
  assert train.shape == (8, 4, 16, 16)
  # 1. Percentile threshold (the default): everything written is farther than it from all training.
  assert _sample(ldm_dir, tmp_path / "a", "--safeguard-data", str(tiny_nifti_dir)) == 0
  record = json.loads((tmp_path / "a" / "safeguard.json").read_text())
  assert record["metric"] == "rmse" and record["percentile"] == 5.0 and record["complete"]
  assert record["threshold"] == pytest.approx(safeguard.percentile_threshold(train), rel=1e-9)
  released = _released(tmp_path / "a")
  assert len(released) == record["released"] == 3
  assert np.all(safeguard.distances(released, train) > record["threshold"])
  # 2. A threshold between the first candidates' distances: some are rejected and redrawn, and
  # still nothing released is within it.
  d = np.sort(safeguard.distances(released, train).min(axis=1))
  threshold = float((d[0] + d[1]) / 2)
  capsys.readouterr()
  code = _sample(ldm_dir, tmp_path / "b", "--safeguard-threshold", str(threshold))
  out = capsys.readouterr()
  record = json.loads((tmp_path / "b" / "safeguard.json").read_text())
  assert record["rejected"] >= 1 and record["threshold_source"].startswith("explicit")
  assert f"rejected {record['rejected']} of {record['candidates']} candidates" in out.out
  released = _released(tmp_path / "b")
  assert len(released) == record["released"]
  assert len(released) == 0 or np.all(safeguard.distances(released, train) > threshold)
  assert code == (0 if record["complete"] else 1)
  # 3. Nothing can pass: no volume is written, exit 1 with a warning naming the rounds.
  code = _sample(ldm_dir, tmp_path / "c", "--safeguard-threshold", "1e6", "--safeguard-max-rounds", "2")
  err = capsys.readouterr().err
  record = json.loads((tmp_path / "c" / "safeguard.json").read_text())
  assert code == 1 and "only 0 of 3" in err and "--safeguard-max-rounds" in err
  assert record == {**record, "released": 0, "complete": False, "rounds": 2}
  assert not list((tmp_path / "c").glob("*.nii.gz"))


def test_safeguard_flags_need_safeguard_and_embedding_needs_weights(ldm_dir, tmp_path, capsys):
  code = cli.main(["sample", "--workdir", str(ldm_dir), "--out", str(tmp_path / "x"), "--n", "1",
                   "--safeguard-threshold", "0.1"])
  assert code == 2 and "without --safeguard" in capsys.readouterr().err
  code = _sample(ldm_dir, tmp_path / "y", "--safeguard-metric", "embedding", "--safeguard-weights",
                 str(tmp_path / "no_such_ssl_run"))
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("jaxldm: error: ") and "--config ssl " in err
  assert not (tmp_path / "y").exists()


def test_sample_safeguard_with_ssl3d_embeddings(ldm_dir, tiny_nifti_dir, tmp_path, capsys):
  from jaxldm.eval import features
  from jaxldm.train import ssl

  ssl_dir = tmp_path / "ssl"
  ssl.train_and_evaluate(load_config("ssl:tiny", {
      **DATA, "data.root": str(tiny_nifti_dir), "train.batch_size": 8, "train.log_every": 1,
      "train.checkpoint_every": 1, "train.steps": 1, "train.num_devices": 1}), ssl_dir)
  assert _sample(ldm_dir, tmp_path / "out", "--safeguard-metric", "embedding", "--safeguard-weights",
                 str(ssl_dir), "--safeguard-percentile", "50") in (0, 1)
  record = json.loads((tmp_path / "out" / "safeguard.json").read_text())
  extractor = features.get_extractor("ssl3d", weights=ssl_dir)
  assert record["metric"] == "embedding" and record["percentile"] == 50
  assert record["features"] == {"name": "ssl3d", "version": extractor.version}
  train = extractor(generate.training_volumes(ldm_dir, tiny_nifti_dir))
  assert record["threshold"] == pytest.approx(
      safeguard.percentile_threshold(train, percentile=50, metric="embedding"), rel=1e-6)
  released = _released(tmp_path / "out")
  assert len(released) == record["released"] >= 1
  d = safeguard.distances(extractor(released), train, metric="embedding")
  assert np.all(d > record["threshold"])


# --------------------------------------------------------------------------------------------------
# jaxldm sample follows the run: its sampling.* defaults, its categories, its attribute range.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conditional_ldm_dir(tmp_path_factory):
  from tests.train.conftest import write_tiny_nifti

  data = write_tiny_nifti(tmp_path_factory.mktemp("cond_data"), seed=5)
  rows = ["subject_id,edv,sex"] + [f"s{i:02d},{100 + 5 * i},{'FM'[i % 2]}" for i in range(8)]
  (data / "attributes.csv").write_text("\n".join(rows) + "\n")
  ae = tmp_path_factory.mktemp("cond_ae")
  config = load_config("autoencoder:tiny",
                       {**DATA, "data.root": str(data), "train.steps": 1, "train.batch_size": 4})
  autoencoder.train_and_evaluate(config, ae)
  workdir = tmp_path_factory.mktemp("cond_ldm")
  config = load_config("ldm:tiny", {
      **DATA, "data.root": str(data), "data.attributes": ("edv", "sex"), "data.categories": ("sex=F|M",),
      "autoencoder_workdir": str(ae), "model.base_channels": 8, "model.context_dim": 8, "model.attention_levels": (),
      "sampling.num_steps": 3, "sampling.guidance_scale": 1.5, "train.log_every": 1, "train.sample_every": 0,
      "train.checkpoint_every": 1, "train.steps": 1, "train.batch_size": 4})
  ldm.train_and_evaluate(config, workdir)
  return workdir


def test_sample_uses_the_runs_sampling_categories_and_marks_files_synthetic(conditional_ldm_dir, tmp_path, capsys):
  out = tmp_path / "s"
  assert cli.main(["sample", "--workdir", str(conditional_ldm_dir), "--out", str(out), "--n", "2",
                   "--batch-size", "2", "--attr", "sex=M", "--attr", "edv=900"]) == 0
  captured = capsys.readouterr()
  assert "3 steps, guidance 1.5" in captured.out  # The run's sampling.num_steps and guidance_scale.
  warning = [line for line in captured.err.splitlines() if line.startswith("jaxldm: warning: --attr edv=900")]
  assert warning and "std from the training mean 117.5" in warning[0], captured.err
  assert "sex" not in captured.err
  table = (out / "attributes.csv").read_text().splitlines()
  assert table[0] == "subject_id,edv,sex" and table[1].endswith(",900,1")
  descrip = nib.load(str(out / "sample-00000.nii.gz")).header["descrip"].tobytes().rstrip(b"\0").decode()
  assert descrip == f"jaxldm synthetic; model {conditional_ldm_dir.name}; epsilon non-private"

  assert cli.main(["sample", "--workdir", str(conditional_ldm_dir), "--out", str(tmp_path / "t"), "--n", "1",
                   "--attr", "edv=110", "--steps", "2", "--guidance", "0"]) == 0
  captured = capsys.readouterr()
  assert "2 steps, guidance 0" in captured.out and "warning" not in captured.err

  assert cli.main(["sample", "--workdir", str(conditional_ldm_dir), "--out", str(tmp_path / "u"), "--n", "1",
                   "--attr", "sex=X"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxldm: error: --attr sex=X: expected one of F, M") and len(err.splitlines()) == 1
  assert not (tmp_path / "u").exists()


def test_synthetic_descrip_names_the_epsilon_and_fits_the_header(tmp_path):
  from jaxldm.privacy.ledger import PrivacyLedger

  run = tmp_path / ("r" * 100)
  run.mkdir()
  (run / "ldm.json").write_text(json.dumps({"private": True}))
  ledger = PrivacyLedger.load_or_create(str(run), sampling_rate=0.125, noise_multiplier=1.0, l2_clip_norm=1.0,
                                        delta=1e-5, dataset_size=64, accountant="rdp")
  ledger.record_steps(100)
  descrip = generate.synthetic_descrip(run)
  assert descrip.startswith("jaxldm synthetic; model rrr") and len(descrip.encode()) <= 80
  assert descrip.endswith(f"; epsilon {ledger.composed_epsilon():.3g}")
