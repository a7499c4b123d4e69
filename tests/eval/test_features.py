"""Feature extractors by name: the project's ssl3d encoder from a trained workdir, and MedicalNet /
slice-wise 2D ResNets from PyTorch files (compared with the PyTorch networks themselves)."""

import importlib.util
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from jaxldm.config import ConfigError, load_config
from jaxldm.eval import features
from jaxldm.train import ssl

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (4, 16, 16)


@pytest.fixture(scope="module")
def ssl_workdir(tmp_path_factory):
  """A 3-step tiny configs/ssl.py run on 8 smooth random volumes."""
  root = tmp_path_factory.mktemp("ssl_data")
  rng = np.random.default_rng(0)
  for i in range(8):
    v = gaussian_filter(rng.normal(size=(16, 16, 4)), (2, 2, 0.5)).astype(np.float32)
    nib.save(nib.Nifti1Image(v, np.diag([4.0, 4.0, 20.0, 1.0])), root / f"s{i:02d}.nii.gz")
  config = load_config("ssl:tiny", {
      "data.root": str(root), "data.shape": SHAPE, "data.spacing": (20.0, 4.0, 4.0), "train.batch_size": 8,
      "train.log_every": 1, "train.checkpoint_every": 3, "train.steps": 3, "train.num_devices": 1})
  workdir = tmp_path_factory.mktemp("ssl_run")
  ssl.train_and_evaluate(config, workdir)
  return workdir


def _volumes(n, shape=SHAPE, seed=0):
  return np.tanh(np.random.default_rng(seed).normal(size=(n, *shape))).astype(np.float32)


def test_ssl3d_loads_a_trained_workdir_and_is_batch_invariant(ssl_workdir):
  ex = features.get_extractor("ssl3d", weights=ssl_workdir, batch_size=3)
  info = json.loads((ssl_workdir / "encoder.json").read_text())
  assert ex.name == "ssl3d" and ex.version == info["version"] and ex.version.startswith("ssl3d-")
  vols = _volumes(5)
  f = ex(vols)
  assert f.shape == (5, 16) and f.dtype == np.float32 and np.all(np.isfinite(f))
  # Padding of the last batch and the batch size do not change anyone's features.
  np.testing.assert_allclose(features.get_extractor("ssl3d", weights=ssl_workdir, batch_size=8)(vols), f,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ex(vols[3:4]), f[3:4], rtol=1e-5, atol=1e-6)
  assert not np.allclose(f[0], f[1])
  # Another input shape is resized to the training shape, so features stay comparable.
  assert ex(_volumes(2, (6, 20, 20))).shape == (2, 16)
  assert ex(np.zeros((0, *SHAPE))).shape == (0, 16)
  with pytest.raises(ValueError, match=r"\(N, D, H, W\)"):
    ex(vols[0])


def test_ssl3d_refuses_a_missing_or_inconsistent_workdir(ssl_workdir, tmp_path):
  with pytest.raises(ConfigError, match=r"--config ssl "):
    features.get_extractor("ssl3d", weights=tmp_path / "nothing")
  copy = tmp_path / "copy"
  import shutil
  shutil.copytree(ssl_workdir, copy)
  info = json.loads((copy / "encoder.json").read_text())
  info["version"] = "ssl3d-0000000000000000"
  (copy / "encoder.json").write_text(json.dumps(info))
  with pytest.raises(ConfigError, match="not the encoder"):
    features.get_extractor("ssl3d", weights=copy)


@pytest.mark.parametrize("name", ["medicalnet", "slice2d"])
def test_pretrained_extractors_need_a_weight_file(name, tmp_path):
  with pytest.raises(ConfigError, match="pass the path to the weight file"):
    features.get_extractor(name)
  with pytest.raises(ConfigError, match="does not exist"):
    features.get_extractor(name, weights=tmp_path / "missing.pth")
  with pytest.raises(ConfigError, match="unknown feature extractor 'inception'"):
    features.get_extractor("inception", weights=tmp_path / "missing.pth")


def _torch_models():
  """The PyTorch MedicalNet/torchvision ResNets of tests/models/torch_resnets.py."""
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location("_torch_resnets", ROOT / "tests/models/torch_resnets.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_medicalnet_extractor_matches_pytorch_on_zscored_volumes(tmp_path):
  tm = _torch_models()
  torch = tm.torch
  torch.manual_seed(0)
  net = tm.randomised(tm.TorchResNet(tm.TorchBasic, (1, 1, 1, 1), dims=3, shortcut="A"))
  tm.save_wrapped(net, tmp_path / "resnet_10.pth")
  ex = features.get_extractor("medicalnet", weights=tmp_path / "resnet_10.pth", batch_size=2)
  assert ex.name == "medicalnet" and ex.version.startswith("medicalnet-resnet10A-") and ex.feature_dim == 512
  vols = _volumes(3, (6, 20, 20))
  z = (vols - vols.mean(axis=(1, 2, 3), keepdims=True)) / vols.std(axis=(1, 2, 3), keepdims=True)
  with torch.no_grad():
    expected = net.features(torch.from_numpy(z[:, None])).numpy()
  np.testing.assert_allclose(ex(vols), expected, atol=1e-4, rtol=0)
  # z-scoring: an affine intensity change does not change the features.
  np.testing.assert_allclose(ex(2 * vols + 0.5), expected, atol=1e-4, rtol=0)
  resized = features.get_extractor("medicalnet", weights=tmp_path / "resnet_10.pth", input_shape=(8, 24, 24))
  assert resized(vols).shape == (3, 512) and resized.version != ex.version
  with pytest.raises(ConfigError, match="'slice2d'"):
    net2d = tm.randomised(tm.TorchResNet(tm.TorchBasic, (1, 1, 1, 1), dims=2, dilated=False, in_channels=3))
    torch.save(net2d.state_dict(), tmp_path / "r2d.pth")
    features.get_extractor("medicalnet", weights=tmp_path / "r2d.pth")


def test_slice2d_extractor_averages_pytorch_slice_features(tmp_path):
  tm = _torch_models()
  torch = tm.torch
  torch.manual_seed(1)
  net = tm.randomised(tm.TorchResNet(tm.TorchBasic, (1, 1, 1, 1), dims=2, dilated=False, in_channels=3))
  torch.save(net.state_dict(), tmp_path / "resnet.pth")
  ex = features.get_extractor("slice2d", weights=tmp_path / "resnet.pth", image_size=None, batch_size=2)
  assert ex.name == "slice2d" and ex.feature_dim == 512
  vols = _volumes(3, (4, 24, 24))
  images = np.clip((vols + 1) / 2, 0, 1).reshape(-1, 1, 24, 24).repeat(3, axis=1)
  images = (images - np.reshape(features.IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(features.IMAGENET_STD, (1, 3, 1, 1))
  with torch.no_grad():
    per_slice = net.features(torch.from_numpy(images.astype(np.float32))).numpy()
  expected = per_slice.reshape(3, 4, -1).mean(axis=1)
  np.testing.assert_allclose(ex(vols), expected, atol=1e-4, rtol=0)
  resized = features.get_extractor("slice2d", weights=tmp_path / "resnet.pth", image_size=32)
  out = resized(vols)
  assert out.shape == (3, 512) and np.all(np.isfinite(out)) and resized.version != ex.version
  with pytest.raises(ConfigError, match="'medicalnet'"):
    net3d = tm.randomised(tm.TorchResNet(tm.TorchBasic, (1, 1, 1, 1), dims=3))
    torch.save(net3d.state_dict(), tmp_path / "r3d.pth")
    features.get_extractor("slice2d", weights=tmp_path / "r3d.pth")
