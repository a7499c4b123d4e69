"""Per-example gradient throughput: the same model, data and keys under every gradient mode.

  jaxldm bench grads --model unet --config ldm:tiny --batch 8,16,32 --json grads.json

Modes (all jitted, all return a gradient pytree like the params):
  nonprivate       the plain batched gradient of the mean loss (what non-private training does);
  vmap             DP-SGD: per-example gradients by `jax.vmap`, clipped, summed, noised
                   (`jaxldm.privacy.noise.private_grad`, the DP trainers' path);
  vmap_microbatch  the same in sequential microbatches of `microbatch` examples (memory bound);
  loop             one example at a time (microbatch of 1): the baseline vmap is meant to beat.

Timing practice: compile once (timed separately), warm up,
then alternate the modes inside each repeat (so drifting machine load hits every mode alike) and
report the median of `block_until_ready` wall times. Ratios between modes come from one run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm import hostmem
from jaxldm.config import ConfigError, load_config, resolve_spec
from jaxldm.models import conv, layers

MODES = ("nonprivate", "vmap", "vmap_microbatch", "loop")
MODELS = ("unet", "autoencoder")


@dataclasses.dataclass
class Target:
  """A model reduced to what the gradient modes need."""
  model: str
  loss_fn: Callable[..., jax.Array]  # loss_fn(params, example, rng) -> scalar, ONE example.
  params: Any  # The differentiated (trainable) parameters.
  make_batch: Callable[[int], Any]  # B -> pytree of (B, ...) float32 arrays.
  dtype: str


# ---------------------------------------------------------------------------------------------
# Targets built from the training configs
# ---------------------------------------------------------------------------------------------
def _autoencoder_config_for(spec: str) -> ml_collections.ConfigDict:
  """The autoencoder config that goes with an LDM config, same variant (gives latent channels/shape):
  the `autoencoder` preset for a preset, the file `autoencoder.py` next to a user's config file."""
  name, path, variant = resolve_spec(spec)
  if name:
    return load_config(f"autoencoder:{variant}" if variant else "autoencoder")
  sibling = path.with_name("autoencoder.py")
  if not sibling.is_file():
    raise ConfigError(f"--config {spec}: the UNet's latent shape comes from the autoencoder config, "
                      f"expected {sibling} next to it")
  return load_config(f"{sibling}:{variant}" if variant else str(sibling))


def _rng_batch(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Callable[[int], dict]:
  def make(b: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {k: rng.standard_normal((b, *s)).astype(np.float32) for k, s in shapes.items()}
    if "attribute_mask" in out:
      out["attribute_mask"] = (rng.random((b, *shapes["attribute_mask"])) > 0.2).astype(np.float32)
    return out
  return make


def unet_target(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict) -> Target:
  from jaxldm.diffusion.losses import diffusion_loss
  from jaxldm.diffusion.schedules import make_schedule
  from jaxldm.infer import autoencoder
  from jaxldm.infer.ldm import build_unet, unet_apply
  from jaxldm.train import partition

  ae = autoencoder.build_model(ae_config.model)
  latent_shape = tuple(s // f for s, f in zip(config.data.shape, ae.downsampling))
  latent_shape += (ae_config.model.latent_channels,)
  num_attributes = len(config.data.attributes)
  unet = build_unet(config.model, num_attributes, latent_shape[-1])
  dummy = (jnp.zeros((1,) + latent_shape), jnp.zeros((1,), jnp.int32),
           jnp.zeros((1, num_attributes)), jnp.ones((1, num_attributes)))
  params = layers.init_params(unet, jax.random.PRNGKey(config.seed), *dummy)
  trainable, frozen = partition.split(params, config.train.trainable)
  d = config.diffusion
  schedule = make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
  apply_fn = unet_apply(unet)

  def loss_fn(tr, example, rng):
    return diffusion_loss(apply_fn, partition.merge(tr, frozen), example, rng, schedule=schedule,
                          prediction=d.prediction, noise_multiplicity=d.noise_multiplicity,
                          cond_drop_prob=d.cond_drop_prob)

  shapes = {"latent": latent_shape, "attributes": (num_attributes,),
            "attribute_mask": (num_attributes,)}
  return Target("unet", loss_fn, trainable, _rng_batch(shapes), config.model.dtype)


def autoencoder_target(config: ml_collections.ConfigDict) -> Target:
  from jaxldm.infer import autoencoder
  from jaxldm.train import autoencoder as ae_trainer

  model = autoencoder.build_model(config.model)
  shape = tuple(config.data.shape)
  params = layers.init_params(model, jax.random.PRNGKey(config.seed), jnp.zeros((1, *shape, 1)))
  loss = config.loss

  def loss_fn(p, example, rng):
    value, _ = ae_trainer.generator_loss(model, None, p, None, example, rng,
                                         kl_weight=loss.kl_weight, adv_weight=0.0,
                                         adv_loss=loss.adversarial_loss)
    return value

  return Target("autoencoder", loss_fn, params, _rng_batch({"volume": shape}), config.model.dtype)


def build_target(model: str, spec: str, overrides: Sequence[str] = ()) -> Target:
  """The `model` ("unet" or "autoencoder") of config `spec` ("file.py:variant")."""
  if model not in MODELS:
    raise ConfigError(f"--model {model!r}: choose one of {', '.join(MODELS)}")
  config = load_config(spec, overrides)
  trainer = config.get("trainer")
  if model == "unet":
    if trainer != "ldm":
      raise ConfigError(f"--config {spec}: --model unet needs an LDM config (trainer 'ldm'), got {trainer!r}")
    return unet_target(config, _autoencoder_config_for(spec))
  if trainer != "autoencoder":
    raise ConfigError(f"--config {spec}: --model autoencoder needs an autoencoder config, got {trainer!r}")
  return autoencoder_target(config)


# ---------------------------------------------------------------------------------------------
# Gradient modes
# ---------------------------------------------------------------------------------------------
def gradient_fn(mode: str, target: Target, batch_size: int, *, microbatch: int,
                l2_clip_norm: float = 1.0, noise_multiplier: float = 1.0) -> Callable:
  """fn(params, batch, rng) -> gradient pytree, for one mode (not yet jitted)."""
  from jaxldm.privacy import clipping, noise

  loss_fn = target.loss_fn
  if mode == "nonprivate":
    def fn(params, batch, rng):
      # The DP modes' example keys: with C = inf and no noise every mode gives the same gradient.
      example_rng, _ = noise.split_step_rng(rng)
      keys = jax.vmap(lambda i: jax.random.fold_in(example_rng, i))(
          jnp.arange(batch_size, dtype=jnp.uint32))
      mean = lambda p: jax.vmap(lambda ex, k: loss_fn(p, ex, k))(batch, keys).mean()
      # As the trainers' non-private steps: each convolution on the whole batch.
      return jax.grad(conv.merging_examples(mean))(params)
    return fn
  micro = {"vmap": None, "vmap_microbatch": microbatch, "loop": 1}[mode]
  if micro is not None and batch_size % micro:
    raise ConfigError(f"--microbatch {micro} does not divide --batch {batch_size}")

  def fn(params, batch, rng):
    grads, _ = noise.private_grad(loss_fn, params, batch, rng, l2_clip_norm=l2_clip_norm,
                                  noise_multiplier=noise_multiplier, expected_batch_size=batch_size,
                                  microbatch_size=micro)
    return grads
  return fn


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def host_cpu() -> str:
  """The CPU model (device_kind says only "cpu" on the CPU backend)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or "unknown"


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return None


def rss_peak_bytes() -> int:
  # ru_maxrss is KiB on Linux: the process's high-water mark (monotone over the run).
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _program_bytes(compiled) -> int | None:
  m = memory_analysis(compiled)
  return None if m is None else m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"]


def memory_analysis(compiled) -> dict | None:
  """XLA's static memory plan of a compiled program (bytes), or None where the backend has none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if m is None:
    return None
  fields = {"temp_bytes": "temp_size_in_bytes", "argument_bytes": "argument_size_in_bytes",
            "output_bytes": "output_size_in_bytes", "alias_bytes": "alias_size_in_bytes",
            "generated_code_bytes": "generated_code_size_in_bytes"}
  return {k: int(getattr(m, v, 0) or 0) for k, v in fields.items()}


def cost_analysis(compiled) -> dict:
  """XLA's flop and byte counts of a compiled program ({} where the backend gives none).

  XLA counts a loop body once, whatever its trip count: for programs with loops (vmap_microbatch,
  loop) the flops are a lower bound; `useful_flops` in the records (the non-private program's
  flops at the same batch) is the comparable work measure.
  """
  try:
    c = compiled.cost_analysis()
  except Exception:
    return {}
  if isinstance(c, (list, tuple)):  # Older JAX: one dict per program.
    c = c[0] if c else {}
  if not c:
    return {}
  out = {}
  if c.get("flops") is not None and float(c["flops"]) >= 0:
    out["flops"] = float(c["flops"])
  if c.get("bytes accessed") is not None and float(c["bytes accessed"]) >= 0:
    out["bytes_accessed"] = float(c["bytes accessed"])
  return out


def hlo_flops(lowered) -> float | None:
  """The flop count of a lowered, not yet compiled program (XLA's cost analysis of its HLO).

  Backend-independent, convolutions included: on a GPU the compiled program's count leaves out the
  convolutions handed to cuDNN as custom calls (paper UNet, B = 8: 3.4e11 compiled vs 6.8e12 here).
  Where the backend has no cost analysis of a Lowered (JAX raises NotImplementedError on PJRT C API
  plugins, the CUDA one included: the H200 run's `useful_flops` fell back to the compiled count), the
  same HLO is analysed by the CPU client: the count depends on the HLO, not on the backend.
  """
  flops = cost_analysis(lowered).get("flops")  # A Lowered has the same cost_analysis() as a Compiled.
  return flops or _cpu_hlo_flops(lowered)


def _cpu_hlo_flops(lowered) -> float | None:
  """XLA's HLO cost analysis of `lowered` on the CPU client (None where JAX offers no CPU backend)."""
  try:
    from jax._src.lib import _jax  # The function Lowered.cost_analysis calls with its own backend.
    module = lowered.compiler_ir("hlo").as_hlo_module()
    flops = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module).get("flops")
  except Exception:  # No CPU platform (JAX_PLATFORMS=cuda), or an API this JAX lacks.
    return None
  return float(flops) if flops is not None and float(flops) > 0 else None


def _block(tree) -> None:
  jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def check_modes(modes: Sequence[str]) -> None:
  for m in modes:
    if m not in MODES:
      raise ConfigError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")


@dataclasses.dataclass
class Lowered:
  """The modes of one (target, batch size), traced and lowered, not yet compiled."""
  target: Target
  batch_size: int
  microbatch: int
  batch: Any
  rng: jax.Array
  lowered: dict  # mode -> jax.stages.Lowered
  trace_s: dict  # mode -> seconds spent tracing and lowering (part of the records' compile_s).
  conv_weight_grad: str  # The convolution kernel gradient traced into them (jaxldm.models.conv).


def lower(target: Target, batch_size: int, modes: Sequence[str], *, microbatch: int = 0,
          seed: int = 0) -> Lowered:
  """Traces every mode (the convolution kernel-gradient choice is fixed here, at trace time)."""

  check_modes(modes)
  micro = microbatch or max(1, batch_size // 4)
  batch = jax.device_put(target.make_batch(batch_size))
  rng = jax.random.PRNGKey(seed)
  lowered, trace_s = {}, {}
  for mode in modes:
    t0 = time.perf_counter()
    lowered[mode] = jax.jit(gradient_fn(mode, target, batch_size, microbatch=micro)).lower(target.params, batch, rng)
    trace_s[mode] = time.perf_counter() - t0
  return Lowered(target, batch_size, micro, batch, rng, lowered, trace_s, conv.resolved_weight_grad())


def compile_timed(lowered) -> tuple[Any, float]:
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t0


def measure(low: Lowered, compiled: dict, compile_s: dict, *, repeats: int = 5, warmup: int = 2,
            progress=None, deadline: float | None = None) -> list[dict]:
  """Warm-up, then the modes alternate in every repeat; one record per mode.

  `deadline` (a `time.perf_counter()` value, `jaxldm bench gpu-check`'s budget): past it, no further
  warm-up call or repeat starts; the first of each is always run (`times_s` says how many were timed).
  """
  target, b, params, batch, rng = low.target, low.batch_size, low.target.params, low.batch, low.rng
  modes = list(compiled)
  past = lambda: deadline is not None and time.perf_counter() >= deadline
  for mode in modes:
    for i in range(warmup):
      if i and past():
        break
      _block(compiled[mode](params, batch, rng))
  times = {mode: [] for mode in modes}
  for r in range(repeats):
    if r and past():
      break
    for mode in modes:  # Alternate modes: load drift hits all of them.
      key = jax.random.fold_in(rng, r)
      t0 = time.perf_counter()
      _block(compiled[mode](params, batch, key))
      times[mode].append(time.perf_counter() - t0)
    if progress:
      progress(f"B={b} repeat {r + 1}/{repeats}")
  peak = _device_peak_bytes()
  n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
  device = jax.local_devices()[0]
  costs = {mode: cost_analysis(compiled[mode]) for mode in modes}
  hlo = {mode: hlo_flops(low.lowered[mode]) if mode in low.lowered else None for mode in modes}
  # The same work for every mode: the non-private program's HLO count (the compiled count where none).
  useful = hlo.get("nonprivate") or costs.get("nonprivate", {}).get("flops")
  records = []
  for mode in modes:
    step_s = statistics.median(times[mode])
    flops = costs[mode].get("flops")
    records.append({
        "mode": mode, "model": target.model, "batch": b, "params": n_params, "step_s": step_s,
        "examples_per_s": b / step_s, "peak_bytes": peak if peak is not None else rss_peak_bytes(),
        # Device peak: the process's high-water mark so far (JAX has no reset), not this program's.
        "peak_source": "device" if peak is not None else "process_rss",
        "program_bytes": _program_bytes(compiled[mode]), "memory": memory_analysis(compiled[mode]),
        "flops": flops, "hlo_flops": hlo[mode], "bytes_accessed": costs[mode].get("bytes_accessed"),
        "tflops_per_s": flops / step_s / 1e12 if flops else None,
        "useful_flops": useful, "useful_tflops_per_s": useful / step_s / 1e12 if useful else None,
        "compile_s": low.trace_s[mode] + compile_s[mode], "conv_weight_grad": low.conv_weight_grad,
        "microbatch": low.microbatch if mode == "vmap_microbatch" else (1 if mode == "loop" else None),
        "times_s": times[mode], "dtype": target.dtype, "backend": jax.default_backend(),
        "device_kind": device.device_kind, "host_cpu": host_cpu(), "num_threads": os.cpu_count(),
        "host_memory": hostmem.status(),
        "date": datetime.date.today().isoformat(), "jax": jax.__version__})
  _add_ratios(records)
  return records


def run(target: Target, *, batches: Sequence[int], modes: Sequence[str], microbatch: int = 0,
        repeats: int = 5, warmup: int = 2, seed: int = 0, progress=None) -> list[dict]:
  """Times every (mode, batch); returns one record per pair (see the module docstring)."""
  check_modes(modes)
  records = []
  for b in batches:
    low = lower(target, b, modes, microbatch=microbatch, seed=seed)
    compiled, compile_s = {}, {}
    for mode in modes:
      compiled[mode], compile_s[mode] = compile_timed(low.lowered[mode])
      if progress:
        progress(f"compiled {mode} B={b} ({compile_s[mode]:.1f} s)")
    records += measure(low, compiled, compile_s, repeats=repeats, warmup=warmup, progress=progress)
  return records


def _add_ratios(records: list[dict]) -> None:
  base = {(r["model"], r["batch"]): r["step_s"] for r in records if r["mode"] == "nonprivate"}
  for r in records:
    ref = base.get((r["model"], r["batch"]))
    r["ratio_to_nonprivate"] = r["step_s"] / ref if ref else None
