"""`jaxldm bench convs`: the model's convolutions found and counted, the six variants computing the
same gradients, the CLI writing its records."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm import cli
from jaxldm.bench import convs, grads

AE_TINY = ["--config.data.shape=(2,8,8)", "--config.model.channels=(4,8)"]
UNET_TINY = ["--config.data.shape=(2,8,8)", "--config.model.base_channels=4", "--config.model.context_dim=8"]


def _kernels(params) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(1 for path, leaf in leaves if "kernel" in jax.tree_util.keystr(path) and leaf.ndim == 5)


@pytest.mark.parametrize("model,config,overrides", [("autoencoder", "autoencoder:tiny", AE_TINY),
                                                    ("unet", "ldm:tiny", UNET_TINY)])
def test_every_convolution_is_found_once(model, config, overrides):
  target = grads.build_target(model, config, overrides)
  layers = convs.model_layers(target)
  # Each 3D conv module runs once per example's loss: one traced convolution per 5-D kernel.
  assert sum(layers.values()) == _kernels(target.params) > 0
  for layer in layers:
    assert len(layer.input_shape) == 4 and len(layer.kernel_shape) == 5
    assert layer.input_shape[-1] == layer.kernel_shape[-2] * layer.feature_group_count
    assert layer.flops() > 0


def test_flops_match_xla_count():
  layer = convs.Layer((4, 8, 8, 3), (3, 3, 3, 3, 5), (1, 2, 2), ((0, 0), (0, 0), (0, 0)), (1, 1, 1), (1, 1, 1),
                      1, "float32")
  x, w = jnp.ones((1,) + layer.input_shape), jnp.ones(layer.kernel_shape)
  lowered = jax.jit(lambda x, w: convs._native(layer, x, w)).lower(x, w)
  assert layer.flops() == grads.hlo_flops(lowered)


@pytest.mark.parametrize("strides,padding", [((1, 1, 1), ((1, 1), (1, 1), (1, 1))),
                                             ((1, 2, 2), ((0, 0), (0, 1), (0, 1)))])
def test_variants_compute_the_same_gradients(strides, padding):
  layer = convs.Layer((3, 6, 6, 4), (3, 3, 3, 4, 5), strides, padding, (1, 1, 1), (1, 1, 1), 1, "float32")
  b = 3
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (b,) + layer.input_shape)
  w = jax.random.normal(kw, layer.kernel_shape) * 0.1
  y = convs._native(layer, x, w)
  dy = jax.random.normal(kd, y.shape)
  dx_b, dw_b = jax.jit(convs._layer_fn(layer, "batched"))(x, w, dy)
  for variant in ("batched_slices", "batched_taps"):
    dx_bt, dw_bt = jax.jit(convs._layer_fn(layer, variant))(x, w, dy)
    np.testing.assert_allclose(dx_bt, dx_b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw_bt, dw_b, rtol=1e-4, atol=1e-4)
  for variant in ("native", "slices", "taps"):
    dx, dw = jax.jit(convs._layer_fn(layer, variant))(x, w, dy)
    assert dw.shape == (b,) + layer.kernel_shape  # One kernel gradient per example.
    np.testing.assert_allclose(dx, dx_b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.sum(0), dw_b, rtol=1e-4, atol=1e-4)
    # Per example: the batched gradient of that example alone.
    _, dw0 = convs._layer_fn(layer, "batched")(x[:1], w, dy[:1])
    np.testing.assert_allclose(dw[0], dw0, rtol=1e-4, atol=1e-4)


def test_cli_writes_records(tmp_path, capsys):
  out = tmp_path / "convs.json"
  code = cli.main(["bench", "convs", "--model", "autoencoder", "--config", "autoencoder:tiny", *AE_TINY,
                   "--batch", "2", "--variants", "batched,native", "--max-layers", "2", "--repeats", "1",
                   "--warmup", "0", "--json", str(out)])
  assert code == 0
  records = json.loads(out.read_text())
  assert len(records) == 2
  assert records[0]["flops_per_example"] * records[0]["count"] >= records[1]["flops_per_example"] * records[1]["count"]
  for r in records:
    assert set(r["step_s"]) == {"batched", "native"} and all(v > 0 for v in r["step_s"].values())
    assert r["ratio_to_batched"]["batched"] == 1.0 and r["count"] >= 1
  assert "all layers" in capsys.readouterr().out


def test_unknown_variant_is_a_user_error(tmp_path, capsys):
  out = tmp_path / "convs.json"
  code = cli.main(["bench", "convs", "--model", "autoencoder", "--config", "autoencoder:tiny", *AE_TINY,
                   "--variants", "batched,fast", "--json", str(out)])
  assert code == 2 and not out.exists()
  assert "--variants: unknown 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("strides,padding,dilation", [((1, 1, 1), ((1, 1), (1, 1), (1, 1)), (1, 1, 1)),
                                                      ((1, 2, 2), ((0, 0), (0, 1), (0, 1)), (1, 1, 1)),
                                                      ((1, 1, 1), ((2, 0), (2, 2), (0, 2)), (1, 2, 2))])
def test_pytorch_variant_computes_the_same_gradients(strides, padding, dilation):
  """The PyTorch column times the same work: its gradients (back in JAX's layouts) equal `batched`'s,
  asymmetric padding and kernel dilation included."""
  pytest.importorskip("torch")
  layer = convs.Layer((3, 7, 6, 4), (3, 3, 3, 4, 5), strides, padding, dilation, (1, 1, 1), 1, "float32")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2,) + layer.input_shape, np.float32))
  w = jnp.asarray(0.1 * rng.standard_normal(layer.kernel_shape, np.float32))
  dy = jnp.asarray(rng.standard_normal(convs._native(layer, x, w).shape, np.float32))
  want_dx, want_dw = jax.jit(convs._layer_fn(layer, "batched"))(x, w, dy)
  dx, dw = convs.to_channels_last(*convs.torch_layer_fn(layer, x, w, dy)())
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4)


def test_cli_pytorch_column(tmp_path, capsys):
  pytest.importorskip("torch")
  out = tmp_path / "convs.json"
  code = cli.main(["bench", "convs", "--model", "autoencoder", "--config", "autoencoder:tiny", *AE_TINY,
                   "--batch", "2", "--variants", "batched_slices,pytorch", "--max-layers", "1", "--repeats", "1",
                   "--warmup", "0", "--json", str(out)])
  assert code == 0
  (record,) = json.loads(out.read_text())
  assert set(record["step_s"]) == {"batched_slices", "pytorch"}
  assert record["ratio_to_pytorch"]["batched_slices"] == pytest.approx(
      record["step_s"]["batched_slices"] / record["step_s"]["pytorch"])
  assert record["torch_threads"] >= 1 and record["torch_version"]
  assert "batched_slices / pytorch" in capsys.readouterr().out


def test_pytorch_variant_without_torch_names_the_install(monkeypatch, tmp_path, capsys):
  from jaxldm.bench import compare

  monkeypatch.setattr(compare, "torch_missing", lambda: ["torch", "opacus"])
  out = tmp_path / "convs.json"
  code = cli.main(["bench", "convs", "--model", "autoencoder", "--config", "autoencoder:tiny", *AE_TINY,
                   "--variants", "batched,pytorch", "--json", str(out)])
  assert code == 2 and not out.exists()
  assert "--variants pytorch needs torch" in capsys.readouterr().err and "[bench]" in compare.INSTALL_HINT


def test_pytorch_variant_refuses_a_jax_accelerator(monkeypatch):
  """PyTorch's column is CPU time: against JAX on a GPU it would compare two devices."""
  pytest.importorskip("torch")
  from jaxldm.config import ConfigError

  target = grads.build_target("autoencoder", "autoencoder:tiny", AE_TINY)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ConfigError, match="PyTorch on the CPU, but JAX runs on gpu"):
    convs.run(target, 2, variants=("batched", "pytorch"), max_layers=1, repeats=1, warmup=0)


def test_layers_not_started_by_the_deadline_are_recorded_skipped(monkeypatch):
  """`deadline` (what `bench gpu-check --convs N` passes): the first layer is timed, the rest are not started."""
  import time

  target = grads.build_target("autoencoder", "autoencoder:tiny", AE_TINY)
  timed = []
  real = convs.time_layer

  def time_layer(layer, batch, **kwargs):
    timed.append(layer)
    out = real(layer, batch, **kwargs)
    time.sleep(max(0.0, deadline - time.perf_counter()))  # The budget ends while the first layer is timed.
    return out
  monkeypatch.setattr(convs, "time_layer", time_layer)
  deadline = time.perf_counter() + 0.5
  records = convs.run(target, 2, variants=("batched",), max_layers=3, repeats=1, warmup=0, deadline=deadline)
  assert len(timed) == 1 and len(records) == 3
  assert "step_s" in records[0] and records[0].get("status", "ok") == "ok"
  assert [r["status"] for r in records[1:]] == ["skipped", "skipped"]
  assert all("step_s" not in r and r["layer"] and r["count"] >= 1 for r in records[1:])
