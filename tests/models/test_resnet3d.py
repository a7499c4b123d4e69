"""The Flax ResNets equal PyTorch ResNets built here with MedicalNet's (3D) and torchvision's (2D)
architecture, once the state dict is converted by `jaxldm.eval.torch_weights` (random weights AND
random BatchNorm statistics, so every mapped tensor matters)."""

import importlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm.config import ConfigError
from jaxldm.eval import torch_weights
from jaxldm.models import resnet3d

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="needs torch: pip install -e '.[bench]'")


@pytest.fixture(scope="module")
def ref():
  """tests/models/torch_resnets.py, imported when a test here first runs, not at collection."""
  return importlib.import_module("torch_resnets")


def _compare(torch_model, path, x_ncdhw, *, dilated):
  import torch

  state = torch_weights.load_state_dict(path)
  spec = torch_weights.infer_resnet(state, str(path))
  flax_model = spec.build(dilated=dilated)
  variables = torch_weights.resnet_variables(state, flax_model, str(path))
  with torch.no_grad():
    expected = torch_model.features(torch.from_numpy(x_ncdhw)).numpy()
  x = jnp.asarray(np.moveaxis(x_ncdhw, 1, -1))
  got = np.asarray(jax.jit(flax_model.apply)(variables, x))
  assert got.shape == expected.shape
  scale = np.abs(expected).max()
  assert scale > 0.5  # Non-degenerate features (measured ~2; max |difference| measured < 1e-6).
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  return spec


@pytest.mark.parametrize("depth,shortcut", [(10, "A"), (18, "B")])
def test_medicalnet_basic_resnets_match_pytorch(tmp_path, ref, depth, shortcut):
  ref.torch.manual_seed(depth)
  block, layers = resnet3d.DEPTHS[depth]
  model = ref.randomised(ref.TorchResNet(ref.TorchBasic, layers, dims=3, shortcut=shortcut), seed=depth)
  ref.save_wrapped(model, tmp_path / "w.pth")
  x = np.random.default_rng(0).normal(size=(2, 1, 6, 24, 20)).astype(np.float32)
  spec = _compare(model, tmp_path / "w.pth", x, dilated=True)
  assert (spec.dims, spec.block, spec.layers, spec.shortcut, spec.depth) == (3, "basic", layers, shortcut, depth)


def test_medicalnet_bottleneck_resnet_matches_pytorch(tmp_path, ref):
  # ResNet-50's block and shortcut with one block per layer: the same code path, a fraction of the cost.
  ref.torch.manual_seed(0)
  model = ref.randomised(ref.TorchResNet(ref.TorchBottleneck, (1, 1, 1, 1), dims=3, shortcut="B"))
  ref.save_wrapped(model, tmp_path / "w.pth", data_parallel_prefix=False)
  x = np.random.default_rng(1).normal(size=(1, 1, 5, 16, 16)).astype(np.float32)
  spec = _compare(model, tmp_path / "w.pth", x, dilated=True)
  assert (spec.block, spec.shortcut, spec.depth) == ("bottleneck", "B", None)


@pytest.mark.parametrize("block", ["TorchBasic", "TorchBottleneck"])
def test_torchvision_layout_2d_resnets_match_pytorch(tmp_path, ref, block):
  ref.torch.manual_seed(1)
  model = ref.randomised(ref.TorchResNet(getattr(ref, block), (1, 1, 1, 1), dims=2, shortcut="B", dilated=False,
                                         in_channels=3))
  ref.torch.save(model.state_dict(), tmp_path / "w.pth")  # torchvision files are bare state dicts.
  x = np.random.default_rng(2).normal(size=(3, 3, 40, 36)).astype(np.float32)
  spec = _compare(model, tmp_path / "w.pth", x, dilated=False)
  assert (spec.dims, spec.in_channels) == (2, 3)


def test_incomplete_or_foreign_files_are_refused(tmp_path, ref):
  torch = ref.torch
  model = ref.randomised(ref.TorchResNet(ref.TorchBasic, (1, 1, 1, 1), dims=3, shortcut="B"))
  state = model.state_dict()
  del state["layer3.0.bn2.running_var"]
  torch.save(state, tmp_path / "broken.pth")
  loaded = torch_weights.load_state_dict(tmp_path / "broken.pth")
  spec = torch_weights.infer_resnet(loaded)
  with pytest.raises(ConfigError, match=r"layer3\.0\.bn2\.running_var"):
    torch_weights.resnet_variables(loaded, spec.build(dilated=True), "broken.pth")
  torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
  with pytest.raises(ConfigError, match="conv1.weight"):
    torch_weights.infer_resnet(torch_weights.load_state_dict(tmp_path / "other.pth"))
  with pytest.raises(ConfigError, match="does not exist"):
    torch_weights.load_state_dict(tmp_path / "missing.pth")
