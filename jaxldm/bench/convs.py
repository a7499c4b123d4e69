"""`jaxldm bench convs`: where a model's private-gradient cost sits, one convolution layer at a time.

  jaxldm bench convs --model unet --config ldm:paper --batch 8 --json convs.json

The model's loss is traced once with XLA's native convolution (`jax.make_jaxpr`) and every
convolution in it is collected with its shapes (per example), strides, padding and dilation;
identical layers are counted once with their multiplicity. For each distinct layer, on the same
random inputs, up to six programs are timed, each the layer's whole backward work (forward, input
gradient and kernel gradient of `sum(conv(x, w) * dy)`):

  batched         one kernel gradient for the batch, XLA's convolution (the non-private step on GPUs/TPUs);
  batched_slices  the same on jaxldm's CPU route (2D convolutions over slices and their own kernel
                  gradient, `jaxldm.models.conv`: the non-private step on CPUs);
  batched_taps    the same with the route's per-tap GEMM kernel gradient;
  native          `jax.vmap` over the examples with XLA's convolution: per-example kernel gradients
                  (the private step with `--conv native`, the default on GPUs/TPUs);
  slices          the same on the CPU route, one 2D kernel gradient per example (the private step on CPUs);
  taps            the same with per-tap GEMM kernel gradients.
  pytorch         the batched work in PyTorch on the CPU (`torch.nn.functional.conv{1,2,3}d`, float32,
                  channels-first, all cores as `jaxldm bench compare` runs it; the bench extra): which
                  layers the non-private step loses to PyTorch's, layer by layer. Not in the default set;
                  only where JAX runs on the CPU too.

Each record gives the medians, the ratios to `batched`, and the layer's count, so the sums
weighted by count say how much of the model's private-step overhead (`jaxldm bench grads`) the
convolutions explain, and which kernel gradient to pick per backend. Measured on an H200
(2026-12-04) the paper models' private step cost 3-6x the non-private one (`benchmarks/RESULTS.md`,
"GPU"); this is the measurement that locates it.

The layers are those of the native trace. On the CPU route an upsampling layer (nearest upsampling
then a convolution) runs as one smaller convolution per output phase of the low-resolution input
(`jaxldm.models.conv.upsampled_conv`, ~2x less work); its row here times the convolution of the
upsampled input, as XLA's native route runs it.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import statistics
import time
from collections.abc import Sequence

import jax
from jax import lax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

VARIANTS = ("batched", "batched_slices", "batched_taps", "native", "slices", "taps", "pytorch")
JAX_VARIANTS = VARIANTS[:-1]  # The default set: the PyTorch column needs the optional bench extra.
# The CPU route each variant traces (jaxldm.models.conv); the others use XLA's convolution.
_ROUTES = {"batched_slices": "slices", "batched_taps": "taps", "slices": "slices", "taps": "taps"}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One convolution as the model calls it, per example (no batch axis in `input_shape`)."""
  input_shape: tuple[int, ...]  # Spatial..., in channels (channels-last).
  kernel_shape: tuple[int, ...]  # Spatial..., in, out.
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  rhs_dilation: tuple[int, ...]
  lhs_dilation: tuple[int, ...]
  feature_group_count: int
  dtype: str

  def flops(self) -> float:
    """Forward flops for one example: 2 x output positions x kernel taps x kernel in x out channels."""
    spatial = [((n - 1) * ld + 1 + lo + hi - ((k - 1) * rd + 1)) // s + 1
               for n, k, s, (lo, hi), rd, ld in zip(self.input_shape[:-1], self.kernel_shape[:-2], self.strides,
                                                     self.padding, self.rhs_dilation, self.lhs_dilation)]
    return 2.0 * float(np.prod(spatial)) * float(np.prod(self.kernel_shape[:-2])) * self.kernel_shape[-2] * \
        self.kernel_shape[-1]

  def describe(self) -> str:
    spatial = "x".join(map(str, self.input_shape[:-1]))
    k = "x".join(map(str, self.kernel_shape[:-2]))
    extra = "" if set(self.strides) == {1} else f" stride {'x'.join(map(str, self.strides))}"
    extra += "" if set(self.lhs_dilation) == {1} else f" lhs-dilation {'x'.join(map(str, self.lhs_dilation))}"
    return f"{spatial} {self.kernel_shape[-2]}->{self.kernel_shape[-1]} k{k}{extra}"


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def collect(jaxpr, out: collections.Counter) -> None:
  """Counts every `conv_general_dilated` in a jaxpr and its sub-jaxprs (jit, remat, scan, ...)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      p = eqn.params
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      dn = p["dimension_numbers"]
      channels_last = (tuple(dn.lhs_spec) == (0, lhs.ndim - 1) + tuple(range(1, lhs.ndim - 1))
                       and tuple(dn.rhs_spec) == (rhs.ndim - 1, rhs.ndim - 2) + tuple(range(rhs.ndim - 2)))
      if not channels_last:  # Every model here is channels-last; anything else is skipped, not guessed.
        continue
      out[Layer(tuple(lhs.shape[1:]), tuple(rhs.shape), tuple(p["window_strides"]),
                tuple(tuple(int(a) for a in pad) for pad in p["padding"]),
                tuple(p["rhs_dilation"] or (1,) * (lhs.ndim - 2)), tuple(p["lhs_dilation"] or (1,) * (lhs.ndim - 2)),
                int(p["feature_group_count"]), str(lhs.dtype))] += 1
    for sub in _sub_jaxprs(eqn):
      collect(sub, out)


def model_layers(target) -> collections.Counter:
  """The distinct convolutions of one example's loss, with their counts (traced with XLA's convs)."""
  from jaxldm.models import conv as conv_lib

  example = jax.tree_util.tree_map(lambda a: a[0], target.make_batch(1))
  with conv_lib.weight_grad("native"):
    closed = jax.make_jaxpr(target.loss_fn)(target.params, example, jax.random.PRNGKey(0))
  layers: collections.Counter = collections.Counter()
  collect(closed.jaxpr, layers)
  return layers


def _layer_fn(layer: Layer, variant: str):
  """fn(x (B, ...), w, dy (B, ...)) -> (dx, dw): the layer's backward work in one variant."""
  from jaxldm.models import conv as conv_lib

  def conv(x, w):
    if variant in _ROUTES:  # The route is chosen at trace time, inside this context.
      with conv_lib.weight_grad(_ROUTES[variant]):
        return conv_lib.conv_general_dilated(x, w, layer.strides, layer.padding, lhs_dilation=layer.lhs_dilation,
                                             rhs_dilation=layer.rhs_dilation,
                                             feature_group_count=layer.feature_group_count)
    return _native(layer, x, w)

  def backward(x, w, dy):
    _, vjp = jax.vjp(conv, x, w)
    return vjp(dy)

  if variant.startswith("batched"):
    return backward

  def per_example(x1, w, dy1):  # One example as a batch of one; the kernel gradient is its own.
    dx, dw = backward(x1[None], w, dy1[None])
    return dx[0], dw
  return jax.vmap(per_example, in_axes=(0, None, 0))


def _native(layer: Layer, x, w):
  from jaxldm.models import conv as conv_lib
  return lax.conv_general_dilated(x, w, layer.strides, layer.padding, lhs_dilation=layer.lhs_dilation,
                                  rhs_dilation=layer.rhs_dilation,
                                  dimension_numbers=conv_lib._dimension_numbers(x.ndim),
                                  feature_group_count=layer.feature_group_count)


def torch_layer_fn(layer: Layer, x, w, dy):
  """fn() -> (dx, dw): the layer's batched backward work in PyTorch, on copies of the (channels-last)
  JAX arrays, as the PyTorch twin's convolutions run it: the padding applied with F.pad (explicit, possibly
  asymmetric, as jaxldm's), then conv{1,2,3}d channels-first. dx and dw are PyTorch's layouts
  (channels-first; (out, in, spatial...)); `to_channels_last` turns them into JAX's."""
  import torch
  import torch.nn.functional as F

  from jaxldm.config import ConfigError

  if set(layer.lhs_dilation) != {1}:
    raise ConfigError(f"--variants pytorch: layer {layer.describe()} has input dilation (a transposed "
                      "convolution), which this comparison does not port")
  spatial = len(layer.strides)
  to_first = lambda a: torch.from_numpy(np.moveaxis(np.asarray(a, np.float32), -1, 1).copy())
  xt = to_first(x).requires_grad_(True)
  wt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(w, np.float32), (-1, -2), (0, 1))))
  wt.requires_grad_(True)
  dyt = to_first(dy)
  pads = [p for lo_hi in reversed(layer.padding) for p in lo_hi]  # F.pad lists the LAST axis first.
  conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]

  def fn():
    y = conv(F.pad(xt, pads), wt, stride=layer.strides, dilation=layer.rhs_dilation,
             groups=layer.feature_group_count)
    return torch.autograd.grad(y, (xt, wt), dyt)
  return fn


def to_channels_last(dx, dw) -> tuple[np.ndarray, np.ndarray]:
  """`torch_layer_fn`'s gradients in JAX's layouts: dx (B, spatial..., C), dw (spatial..., in, out)."""
  return (np.moveaxis(dx.detach().numpy(), 1, -1),
          np.moveaxis(dw.detach().numpy(), (0, 1), (-1, -2)))


def time_layer(layer: Layer, batch: int, *, variants: Sequence[str] = JAX_VARIANTS, repeats: int = 10,
               warmup: int = 2, seed: int = 0) -> dict:
  """Median seconds per variant (the JAX variants alternate in every repeat; PyTorch's run after them), and
  compile seconds."""
  from jaxldm.bench.grads import _block

  dtype = jnp.dtype(layer.dtype)
  # Host random numbers: a jax.random.normal compiles one generator program per shape (~1-2 s each on CPU).
  rng = np.random.default_rng(seed)
  normal = lambda shape, scale=1.0: jnp.asarray((scale * rng.standard_normal(shape, np.float32)).astype(dtype))
  x = normal((batch,) + layer.input_shape)
  w = normal(layer.kernel_shape, 0.05)
  y = jax.eval_shape(lambda a, b: _native(layer, a, b), x, w)
  dy = normal(y.shape)
  calls, compile_s = {}, {}
  for v in variants:
    t0 = time.perf_counter()
    if v == "pytorch":
      calls[v] = torch_layer_fn(layer, x, w, dy)
      calls[v]()  # PyTorch's first call (oneDNN primitive creation) stands for the compile.
    else:
      compiled = jax.jit(_layer_fn(layer, v)).lower(x, w, dy).compile()
      calls[v] = lambda compiled=compiled: _block(compiled(x, w, dy))
    compile_s[v] = time.perf_counter() - t0
  for v in variants:
    for _ in range(warmup):
      calls[v]()
  times = {v: [] for v in variants}
  # The JAX variants alternate in every repeat (load drift hits them alike); PyTorch's repeats run in a
  # block of their own: interleaved with XLA's calls, each runtime's idle worker threads slowed the other
  # (the tiny autoencoder's layers: XLA's 53 -> 77 ms in all).
  for group in ([v for v in variants if v != "pytorch"], [v for v in variants if v == "pytorch"]):
    for _ in range(repeats if group else 0):
      for v in group:
        t0 = time.perf_counter()
        calls[v]()  # PyTorch on CPU returns when its gradients are computed (no queue to wait for).
        times[v].append(time.perf_counter() - t0)
  return {"step_s": {v: statistics.median(t) for v, t in times.items()}, "compile_s": compile_s,
          "times_s": times}


def check_variants(variants: Sequence[str]) -> None:
  from jaxldm.config import ConfigError

  for v in variants:
    if v not in VARIANTS:
      raise ConfigError(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
  if "pytorch" in variants:
    from jaxldm.bench import compare

    if compare.torch_missing()[:1] == ["torch"]:  # Opacus is not needed for convolutions.
      raise ConfigError(f"--variants pytorch needs torch, not installed: {compare.INSTALL_HINT}")


def run(target, batch: int, *, variants: Sequence[str] = JAX_VARIANTS, repeats: int = 10, warmup: int = 2,
        max_layers: int = 0, progress=None, deadline: float | None = None) -> list[dict]:
  """One record per distinct convolution of `target`'s model, largest first.

  `max_layers` > 0 times only that many, those with the most flops x count (the rest are listed in
  no record; `totals` then covers the timed layers only). `deadline` (a `time.perf_counter()` value):
  layers not started by then get a record with status "skipped" and no timings.
  """
  check_variants(variants)
  layers = sorted(model_layers(target).items(), key=lambda lc: -lc[0].flops() * lc[1])
  if max_layers > 0:
    layers = layers[:max_layers]
  device = jax.local_devices()[0]
  if "pytorch" in variants:
    import torch

    from jaxldm.config import ConfigError

    if jax.default_backend() != "cpu":
      raise ConfigError(f"--variants pytorch times PyTorch on the CPU, but JAX runs on {jax.default_backend()} "
                        "here: compare on one device with `jaxldm bench compare --device ...`")
    torch.set_num_threads(os.cpu_count() or 1)  # As `jaxldm bench compare` runs the twin: all cores.
  records = []
  for i, (layer, count) in enumerate(layers):
    if deadline is not None and time.perf_counter() >= deadline:
      records.append({"model": target.model, "batch": batch, "layer": layer.describe(), "count": count,
                      "status": "skipped", "error": "not started within the time budget"})
      continue
    if progress:
      progress(f"layer {i + 1}/{len(layers)}: {layer.describe()} (x{count})")
    t = time_layer(layer, batch, variants=variants, repeats=repeats, warmup=warmup)
    rec = {"model": target.model, "batch": batch, "layer": layer.describe(), "count": count,
           "flops_per_example": layer.flops(),
           **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(layer).items()},
           "step_s": t["step_s"], "compile_s": t["compile_s"], "times_s": t["times_s"],
           "backend": jax.default_backend(), "device_kind": device.device_kind,
           "date": datetime.date.today().isoformat(), "jax": jax.__version__}
    if "batched" in t["step_s"]:
      rec["ratio_to_batched"] = {v: s / t["step_s"]["batched"] for v, s in t["step_s"].items()}
    if "pytorch" in t["step_s"]:
      rec["ratio_to_pytorch"] = {v: s / t["step_s"]["pytorch"] for v, s in t["step_s"].items() if v != "pytorch"}
      rec["torch_version"], rec["torch_threads"] = _torch_info()
    records.append(rec)
  return records


def _torch_info() -> tuple[str, int]:
  import torch
  return torch.__version__, torch.get_num_threads()


def totals(records: list[dict]) -> dict:
  """Per variant: the count-weighted sum of the layers' times (seconds per step of the model)."""
  out: dict = {}
  for r in records:
    for v, s in r["step_s"].items():
      out[v] = out.get(v, 0.0) + s * r["count"]
  return out


def table(records: list[dict], title: str = ""):
  from rich.table import Table

  variants = list(records[0]["step_s"]) if records else []
  t = Table(title=title)
  # Ratios to `batched` (XLA's own batched convolution), and to PyTorch's when it was timed.
  bases = [b for b in ("batched", "pytorch") if b in variants]
  ratios = [(v, b) for b in bases for v in variants if v != b and v != "pytorch"]
  for col in ["layer", "count"] + [f"{v} ms" for v in variants] + [f"{v} / {b}" for v, b in ratios]:
    t.add_column(col, justify="left" if col == "layer" else "right", no_wrap=col == "layer")
  for r in records:
    cells = [r["layer"], str(r["count"])] + [f"{r['step_s'][v] * 1e3:,.2f}" for v in variants]
    cells += [f"{r['step_s'][v] / r['step_s'][b]:.2f}" for v, b in ratios]
    t.add_row(*cells)
  tot = totals(records)
  if tot:
    cells = ["all layers (x count)", str(sum(r["count"] for r in records))] + [f"{tot[v] * 1e3:,.1f}" for v in variants]
    cells += [f"{tot[v] / tot[b]:.2f}" for v, b in ratios]
    t.add_row(*cells, style="bold")
  return t
