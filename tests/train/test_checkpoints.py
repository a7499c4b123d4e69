"""Checkpoints written by the trainers' Checkpointer and read back by `infer.checkpoints.restore_params`."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm.config import ConfigError
from jaxldm.fitting import TrainState
from jaxldm.infer import checkpoints
from jaxldm.train import common


def _params(value: float) -> dict:
  return {"params": {"dense": {"kernel": np.full((3, 2), value, np.float32), "bias": np.full((2,), value, np.float32)},
                     "norm": {"scale": np.full((2,), value + 0.5, np.float32)}}}


@pytest.fixture
def saved(tmp_path):
  state = TrainState(step=jnp.asarray(7, jnp.int32), params=_params(1.0), ema_params=_params(2.0),
                     opt_state=(_params(3.0), _params(4.0)), extra=None)
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(7, state, {"note": "kept"})
  ckpt.close()
  return tmp_path / "checkpoints"


@pytest.fixture
def full_reads(monkeypatch):
  """Counts reads of the whole state (the path for checkpoints without names and shapes)."""
  calls = []
  real = checkpoints.untyped_restore
  monkeypatch.setattr(checkpoints, "untyped_restore", lambda: calls.append(1) or real())
  return calls


@pytest.mark.parametrize("use_ema", [True, False])
def test_parameters_alone_are_read_when_the_metadata_names_them(saved, full_reads, use_ema):
  target = _params(0.0)
  params, meta = checkpoints.restore_params(saved, target, use_ema=use_ema)
  assert full_reads == []  # Only the one tree: not the other copy, not the optimizer state.
  assert meta["note"] == "kept" and meta[checkpoints.PARAMETER_SHAPES] == checkpoints.parameter_shapes(target)
  want = 2.0 if use_ema else 1.0
  assert float(params["params"]["dense"]["kernel"][0, 0]) == want
  assert float(params["params"]["norm"]["scale"][0]) == want + 0.5
  assert isinstance(params["params"]["dense"]["bias"], type(jnp.zeros(1)))  # Arrays, as from the full read.


@pytest.mark.parametrize("change, message", [
    (lambda t: t["params"].update(extra={"w": np.zeros(1, np.float32)}), r"missing 1 .*extra"),
    (lambda t: t["params"].pop("norm"), r"unexpected 1 .*norm"),
    (lambda t: t["params"]["dense"].update(kernel=np.zeros((3, 3), np.float32)), r"shape differs for 1 .*kernel"),
])
def test_a_model_that_does_not_fit_is_named_not_loaded(saved, full_reads, change, message):
  target = _params(0.0)
  change(target)
  with pytest.raises(ConfigError, match=f"does not fit the configured model: {message}"):
    checkpoints.restore_params(saved, target)
  assert full_reads == [1]  # The names in the metadata differ: the whole state is read and compared.


def test_checkpoints_without_the_names_are_read_whole(saved, full_reads, monkeypatch):
  # As written before the metadata had the names: the same parameters come back, by the full read.
  monkeypatch.setattr(checkpoints, "PARAMETER_SHAPES", "not_written")
  params, _ = checkpoints.restore_params(saved, _params(0.0))
  assert full_reads == [1] and float(params["params"]["dense"]["kernel"][0, 0]) == 2.0


def test_metadata_that_lies_about_the_arrays_is_still_caught(tmp_path, full_reads):
  # Names and shapes in the metadata fit the target, one saved array does not: the partial read
  # restores it as saved, and the name-by-name comparison after every read names it.
  state = TrainState(step=jnp.asarray(1, jnp.int32), params=_params(1.0), ema_params=_params(2.0),
                     opt_state=(), extra=None)
  state.ema_params["params"]["dense"]["kernel"] = np.zeros((4, 2), np.float32)
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, state)  # The metadata records `params` (3 x 2); the saved EMA kernel is 4 x 2.
  ckpt.close()
  with pytest.raises(ConfigError, match=r"shape differs for 1 .*kernel"):
    checkpoints.restore_params(tmp_path / "checkpoints", _params(0.0))
  assert full_reads == []


def test_restored_parameters_compile_nothing(tmp_path, programs_built):
  """Parameters come back through transfers: jnp.asarray on each leaf compiled a program per new leaf
  shape (~0.5 s of loading the tiny LDM in a fresh process)."""
  tree = lambda v: {"params": {f"w{i}": np.full((i + 1, 5, 17), v, np.float32) for i in range(10)}}
  state = TrainState(step=jnp.asarray(3, jnp.int32), params=tree(1.0), ema_params=tree(2.0), opt_state=(),
                     extra=None)
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(3, state, {})
  ckpt.close()
  with programs_built() as built:
    params, _ = checkpoints.restore_params(tmp_path / "checkpoints", tree(0.0))
  assert built == []
  assert all(float(np.asarray(x).min()) == 2.0 for x in params["params"].values())


@pytest.mark.parametrize("key, value", [("params", 1.0), ("ema_params", 2.0)])
def test_one_saved_tree_is_read_alone(saved, full_reads, key, value):
  """`Checkpointer.restore_tree`: the tree the metadata names, as numpy, without the rest of the state."""
  ckpt = common.Checkpointer(saved)
  tree, meta = ckpt.restore_tree(key)
  assert full_reads == [] and meta["note"] == "kept"
  np.testing.assert_array_equal(tree["params"]["dense"]["kernel"], np.full((3, 2), value, np.float32))
  assert isinstance(tree["params"]["norm"]["scale"], np.ndarray)
  # The same values as in the whole state, read untyped.
  whole, _ = ckpt.restore_untyped()
  assert checkpoints.parameter_shapes(tree) == checkpoints.parameter_shapes(whole[key])
  np.testing.assert_array_equal(tree["params"]["norm"]["scale"], np.asarray(whole[key]["params"]["norm"]["scale"]))
  with pytest.raises(ValueError, match="opt_state"):
    ckpt.restore_tree("opt_state")
  ckpt.close()


def test_one_tree_of_a_checkpoint_without_the_names_comes_from_the_whole_state(saved, full_reads, monkeypatch):
  monkeypatch.setattr(checkpoints, "PARAMETER_SHAPES", "not_written")
  ckpt = common.Checkpointer(saved)
  tree, _ = ckpt.restore_tree("ema_params")
  ckpt.close()
  assert full_reads == [1] and float(tree["params"]["dense"]["kernel"][0, 0]) == 2.0


def test_a_partial_read_that_fails_falls_back_to_the_whole_state(tmp_path, full_reads):
  # The metadata names `params`, which has a leaf the saved EMA tree lacks: reading the EMA tree by
  # those names fails, and the whole state is read instead (then compared name by name).
  params = _params(1.0)
  params["params"]["extra"] = {"w": np.zeros((2,), np.float32)}
  state = TrainState(step=jnp.asarray(1, jnp.int32), params=params, ema_params=_params(2.0), opt_state=(), extra=None)
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, state)
  tree, _ = ckpt.restore_tree("ema_params")
  ckpt.close()
  assert full_reads == [1] and "extra" not in tree["params"] and float(tree["params"]["dense"]["kernel"][0, 0]) == 2.0
  with pytest.raises(ConfigError, match=r"missing 1 .*extra"):  # The saved EMA tree lacks what params has.
    checkpoints.restore_params(tmp_path / "checkpoints", params)
  assert full_reads == [1, 1]
