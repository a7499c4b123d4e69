"""scripts/bench_opacus.py: the PyTorch port has jaxldm's parameter count, Opacus's clipped gradient is
the plain gradient when nothing clips, the clip step is DPOptimizer's, and the records are complete."""

import copy
import importlib.util
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from jaxldm.bench import report  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_opacus.py"
TINY_AE = ["--config.data.shape=(2,8,8)", "--config.model.channels=(4,8)"]
# The latent shape follows from data.shape and configs/autoencoder.py:tiny (one (1, 2, 2) down-sampling).
# K = 2 draws per example: the Opacus rows of one example must be summed before clipping.
TINY_UNET = ["--config.data.shape=(2,8,8)", "--config.model.base_channels=4", "--config.model.context_dim=8",
             "--config.diffusion.noise_multiplicity=2"]


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_opacus", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes.
  spec.loader.exec_module(module)
  torch.set_num_threads(1)
  return module


@pytest.fixture(scope="module")
def targets(bench):
  out = {"autoencoder": bench.build("autoencoder", "configs/autoencoder.py:tiny", TINY_AE),
         "unet": bench.build("unet", "configs/ldm.py:tiny", TINY_UNET)}
  # Zero-initialised output layers (as in jaxldm) would stop every gradient upstream of them:
  # perturb all weights so each layer's per-sample gradient is non-trivial and actually checked.
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for target in out.values():
      for p in target.module.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return out


@pytest.mark.parametrize("model", ["autoencoder", "unet"])
def test_parameter_counts_equal_jaxldm(targets, bench, model):
  target = targets[model]
  assert bench.count(target.module) == (target.jax_params, target.jax_leaves)
  assert target.jax_params > 1000


def test_port_mismatch_is_refused(bench, monkeypatch):
  """`build` fails loudly when the PyTorch network is not jaxldm's (here: one extra bias)."""
  original = bench.AutoencoderKL.__init__

  def extra(self, **kw):
    original(self, **kw)
    self.extra = torch.nn.Parameter(torch.zeros(3))
  monkeypatch.setattr(bench.AutoencoderKL, "__init__", extra)
  with pytest.raises(RuntimeError, match="architectures differ"):
    bench.build("autoencoder", "configs/autoencoder.py:tiny", TINY_AE)


@pytest.mark.parametrize("model", ["autoencoder", "unet"])
def test_opacus_modes_equal_plain_gradient_without_clipping_or_noise(targets, bench, model):
  """C huge, sigma 0: sum of per-example gradients / B is the batch-mean gradient (same draws)."""
  target = targets[model]
  batch = target.make_batch(3)
  plain = [g.clone() for g in bench.gradient_fn("nonprivate", target, 3)(batch, 7)]
  assert all(float(g.abs().max()) > 0 for g in plain)  # Every layer, custom ones included, is tested.
  for mode in ("opacus_functorch", "opacus_hooks"):
    dp = bench.gradient_fn(mode, target, 3, l2_clip_norm=1e9, noise_multiplier=0.0)(batch, 7)
    assert len(dp) == len(plain)
    for a, b in zip(dp, plain):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_clip_step_is_dp_optimizers(targets, bench):
  """With clipping active, `clip_and_noise` gives what Opacus's DPOptimizer.pre_step gives."""
  from opacus.grad_sample.utils import wrap_model
  from opacus.optimizers import DPOptimizer

  target = targets["autoencoder"]
  batch = target.make_batch(4)
  bench._register_grad_samplers()
  net = wrap_model(copy.deepcopy(target.module), grad_sample_mode="hooks", loss_reduction="sum")
  params = [p for p in net.parameters() if p.requires_grad]
  target.loss(net, batch, torch.Generator().manual_seed(0)).sum().backward()
  ours = [g.clone() for g in bench.clip_and_noise(params, 4, l2_clip_norm=1e-2, noise_multiplier=0.0)]
  norms = torch.stack([p.grad_sample.reshape(4, -1).norm(dim=1) for p in params], 1).norm(dim=1)
  assert bool((norms > 1e-2).all())  # Every example is clipped: the test exercises clipping.
  for p in params:
    p.grad = None
  opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=1e-2,
                    expected_batch_size=4, loss_reduction="mean")
  assert opt.pre_step()
  for a, p in zip(ours, params):
    np.testing.assert_allclose(a.numpy(), p.grad.numpy(), rtol=1e-5, atol=1e-9)


def test_run_writes_jaxldm_records(targets, bench, tmp_path):
  records = bench.run(targets["autoencoder"], batches=(2,), modes=bench.MODES, repeats=2, warmup=0)
  assert [(r["mode"], r["batch"]) for r in records] == [(m, 2) for m in bench.MODES]
  path = tmp_path / "opacus.json"
  report.save(path, records)
  loaded = report.load(path)  # Validates the keys `jaxldm bench compare` needs.
  for r in loaded:
    assert r["params"] == targets["autoencoder"].jax_params
    assert r["backend"] == "torch-cpu" and r["framework"] == "pytorch"
    assert r["opacus_version"] and r["torch_version"] and r["device_kind"]
    assert r["step_s"] > 0 and r["examples_per_s"] == pytest.approx(2 / r["step_s"])
    assert r["compile_s"] > 0 and r["peak_bytes"] > 0 and len(r["times_s"]) == 2
  assert loaded[0]["ratio_to_nonprivate"] == 1.0
  rows = report.compare(loaded, loaded)
  assert {r["ratio"] for r in rows if r["a_mode"] == r["b_mode"]} == {1.0}
