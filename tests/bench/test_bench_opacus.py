"""jaxldm/bench/torch_twin.py (scripts/bench_opacus.py): the PyTorch port has jaxldm's parameter count,
Opacus's clipped gradient is the plain gradient when nothing clips, the clip step is DPOptimizer's, and the
records are complete."""

import copy
import importlib
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxldm.bench import report


class _OnFirstUse:
  """`torch`, imported when a test first uses it: importing torch and Opacus costs ~4 s (~10 s where
  Python writes no bytecode), which every pytest worker paid at collection whether or not it ran these."""

  def __getattr__(self, name):
    if name.startswith("__"):  # pytest's collection looks for markers and fixtures on module attributes.
      raise AttributeError(name)
    return getattr(importlib.import_module("torch"), name)


torch = _OnFirstUse()
pytestmark = [
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch", "opacus")),
                       reason="needs the bench extra: pip install -e '.[bench]'"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_opacus.py"
TINY_AE = ["--config.data.shape=(2,8,8)", "--config.model.channels=(4,8)"]
# The latent shape follows from data.shape and configs/autoencoder.py:tiny (one (1, 2, 2) down-sampling).
# K = 2 draws per example: the Opacus rows of one example must be summed before clipping.
TINY_UNET = ["--config.data.shape=(2,8,8)", "--config.model.base_channels=4", "--config.model.context_dim=8",
             "--config.model.attribute_embedding=True",
             "--config.diffusion.noise_multiplicity=2"]


@pytest.fixture(scope="module")
def bench():
  from jaxldm.bench import torch_twin
  torch.set_num_threads(1)
  return torch_twin


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


# ---------------------------------------------------------------------------------------------
# Same weights, same outputs: the port is jaxldm's network, not just one of the same size.
# ---------------------------------------------------------------------------------------------
def _t(x):
  return torch.tensor(np.asarray(x, np.float32))


def _load(bench, layer, p):
  """Copies one Flax layer's parameters into its PyTorch twin (layouts: channels-last -> first)."""
  nn = torch.nn
  with torch.no_grad():
    if isinstance(layer, bench.SameConv3d):
      layer.conv.weight.copy_(_t(p["kernel"]).permute(4, 3, 0, 1, 2))
      layer.conv.bias.copy_(_t(p["bias"]))
    elif isinstance(layer, nn.Linear):  # Dense: kernel (in, out).
      layer.weight.copy_(_t(p["kernel"]).T)
      layer.bias.copy_(_t(p["bias"]))
    elif isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
      layer.weight.copy_(_t(p["scale"]))
      layer.bias.copy_(_t(p["bias"]))
    elif isinstance(layer, bench.Attention):  # DenseGeneral over (heads, head_dim), flattened.
      for name in ("q", "k", "v"):  # kernel (in, heads, head_dim), bias (heads, head_dim).
        getattr(layer, name).weight.copy_(_t(p[name]["kernel"]).flatten(1).T)
        getattr(layer, name).bias.copy_(_t(p[name]["bias"]).flatten())
      layer.out.weight.copy_(_t(p["out"]["kernel"]).flatten(0, 1).T)  # (heads, head_dim, out).
      layer.out.bias.copy_(_t(p["out"]["bias"]))
    else:
      raise TypeError(type(layer))


def _load_resblock(bench, block, p):
  _load(bench, block.norm1, p["Norm_0"]["GroupNorm_0"])
  _load(bench, block.conv1, p["conv1"])
  if block.emb_proj is not None:
    _load(bench, block.emb_proj, p["emb_proj"])
  _load(bench, block.norm2, p["Norm_1"]["GroupNorm_0"])
  _load(bench, block.conv2, p["conv2"])
  if block.skip is not None:
    _load(bench, block.skip, p["skip"])


def _load_sequence(bench, layers, p, counters):
  """Flax names children ClassName_i in call order, per class: walk the PyTorch layers the same way."""
  for layer in layers:
    if isinstance(layer, bench.ResBlock3D):
      kind = "ResBlock3D"
    elif isinstance(layer, bench.AttentionBlock3D):
      kind = "AttentionBlock3D"
    elif isinstance(layer, (bench.Downsample, bench.Upsample)):
      kind = type(layer).__name__
    elif isinstance(layer, bench.VolumeAttention):
      kind = "Norm"
    elif isinstance(layer, torch.nn.GroupNorm):
      kind = "Norm"
    else:
      raise TypeError(type(layer))
    name = f"{kind}_{counters.get(kind, 0)}"
    counters[kind] = counters.get(kind, 0) + 1
    if kind == "ResBlock3D":
      _load_resblock(bench, layer, p[name])
    elif kind == "AttentionBlock3D":
      for child in ("ln_spatial", "spatial", "ln_slices", "slices", "ln_mlp", "mlp_in", "mlp_out",
                    "ln_cross", "cross"):
        _load(bench, getattr(layer, child), p[name][child])
      _load(bench, layer.slice_emb.dense, p[name]["slice_emb"])
    elif kind in ("Downsample", "Upsample"):
      _load(bench, layer.conv, p[name]["Conv_0"])
    elif isinstance(layer, bench.VolumeAttention):
      _load(bench, layer.norm, p[name]["GroupNorm_0"])
      _load(bench, layer.attention, p["mid_attention"])
    else:
      _load(bench, layer, p[name]["GroupNorm_0"])


def _nan_copy(module):
  net = copy.deepcopy(module)
  with torch.no_grad():
    for q in net.parameters():
      q.fill_(float("nan"))
  return net


def _perturbed(tree, seed=0):
  """Every Flax parameter + noise: zero-initialised output layers would make outputs trivially equal."""
  import jax
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def test_same_weights_give_jaxldm_outputs_autoencoder(targets, bench):
  from jaxldm.config import load_config
  from jaxldm.infer import autoencoder

  config = load_config("configs/autoencoder.py:tiny", TINY_AE)
  params = _perturbed(targets["autoencoder"].reference.params)
  net = _nan_copy(targets["autoencoder"].module)
  p = params["params"]
  _load(bench, net.encoder[0], p["encoder"]["conv_in"])
  _load_sequence(bench, net.encoder[1:], p["encoder"], {})
  _load(bench, net.enc_out, p["encoder"]["conv_out"])
  _load(bench, net.decoder[0], p["decoder"]["conv_in"])
  _load_sequence(bench, net.decoder[1:], p["decoder"], {})
  _load(bench, net.dec_out, p["decoder"]["conv_out"])
  assert not any(bool(torch.isnan(q).any()) for q in net.parameters())  # Every weight came from Flax.

  x = targets["autoencoder"].make_batch(2)["volume"]  # (B, 1, D, H, W)
  recon, posterior = autoencoder.build_model(config.model).apply(params, x.numpy().transpose(0, 2, 3, 4, 1))
  with torch.no_grad():
    t_recon, t_mean, t_logvar = net(x)
  np.testing.assert_allclose(t_mean.numpy().transpose(0, 2, 3, 4, 1), posterior.mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(t_logvar.numpy().transpose(0, 2, 3, 4, 1), posterior.logvar, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(t_recon.numpy().transpose(0, 2, 3, 4, 1), recon, rtol=1e-4, atol=1e-5)
  assert float(np.abs(np.asarray(recon)).max()) > 1e-2


def test_same_weights_give_jaxldm_outputs_unet(targets, bench):
  from jaxldm.config import load_config
  from jaxldm.infer.ldm import build_unet
  from jaxldm.train import partition

  config = load_config("configs/ldm.py:tiny", TINY_UNET)
  target = targets["unet"]
  net = _nan_copy(target.module)
  params = _perturbed(partition.merge(target.reference.params, {}))
  p = params["params"]
  _load(bench, net.time_in, p["time_in"])
  _load(bench, net.time_out, p["time_out"])
  a = p["attributes"]
  with torch.no_grad():
    net.attributes.embed.weight.copy_(_t(a["embed_kernel"]))
    net.attributes.embed.bias.copy_(_t(a["embed_bias"]))
    net.attributes.null.token.copy_(_t(a["null_token"]))
  _load(bench, net.attributes.proj, a["proj"])
  _load(bench, net.attributes.norm, a["LayerNorm_0"])
  _load(bench, net.attributes.mix, a["mix"])
  _load(bench, net.attributes.out_norm, a["out_norm"])
  _load(bench, net.attribute_embedding.hidden, p["attribute_embedding"]["hidden"])
  _load(bench, net.attribute_embedding.out, p["attribute_embedding"]["out"])
  _load(bench, net.conv_in, p["conv_in"])
  _load_sequence(bench, [*net.down, *net.mid, *net.up], p, {})
  _load(bench, net.norm_out, p["Norm_0"]["GroupNorm_0"])
  _load(bench, net.conv_out, p["conv_out"])
  assert not any(bool(torch.isnan(q).any()) for q in net.parameters())  # Every weight came from Flax.

  batch = target.make_batch(2)
  t = torch.tensor([3, 120])
  mask = batch["attribute_mask"].clone()
  mask[1] = 0.0  # One example fully unconditional: the null token alone is attended.
  x = batch["latent"]
  unet = build_unet(config.model, len(config.data.attributes), x.shape[1])
  out = unet.apply(params, x.numpy().transpose(0, 2, 3, 4, 1), t.numpy(), batch["attributes"].numpy(),
                   mask.numpy())
  with torch.no_grad():
    t_out = net(x, t, batch["attributes"], mask)
  np.testing.assert_allclose(t_out.numpy().transpose(0, 2, 3, 4, 1), out, rtol=1e-4, atol=1e-5)
  assert float(np.abs(np.asarray(out)).std()) > 1e-2


def test_script_runs_the_twin():
  """scripts/bench_opacus.py is a thin entry point to jaxldm.bench.torch_twin."""
  proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "--device" in proc.stdout and "--keep-going" in proc.stdout


def test_keep_going_writes_the_records_after_each_batch(bench, tmp_path, monkeypatch):
  """With --keep-going the twin saves its records after every batch: a caller that stops it at a time
  limit (`jaxldm bench gpu-check`) keeps the batches it finished. A batch that fails is recorded."""
  out = tmp_path / "twin.json"
  real_run, seen = bench.run, []

  def run(target, batches, **kwargs):
    if batches == (4,):  # By the second batch, the first one's records are on disk.
      seen.extend((r["batch"], r["mode"]) for r in report.load(out))
      raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real_run(target, batches=batches, **kwargs)
  monkeypatch.setattr(bench, "run", run)
  code = bench.main(["--model", "autoencoder", "--config", "configs/autoencoder.py:tiny", "--batch", "2,4",
                     "--modes", "nonprivate", "--repeats", "1", "--warmup", "0", "--keep-going", "--json", str(out),
                     *TINY_AE])
  assert code == 0
  assert seen == [(2, "nonprivate")]
  records = json.loads(out.read_text())  # (report.load would refuse the failed batch's record: no timings.)
  assert [(r["batch"], r["mode"], r.get("status", "ok")) for r in records] == [(2, "nonprivate", "ok"),
                                                                                (4, "nonprivate", "oom")]
