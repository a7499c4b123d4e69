"""`jaxldm bench compare`: jaxldm and its PyTorch/Opacus twin on the same model and batch, one command.

  jaxldm bench compare --model unet --config ldm:tiny --batch 8 --json compare.json

The twin (`jaxldm.bench.torch_twin`) runs first, in a subprocess (its own threads and GPU memory;
JAX there stays on the CPU, it only counts parameters), then jaxldm in this process. Ratios, per
(model, batch), each > 1 meaning "jaxldm is that many times faster" where it says so:

  opacus_dp / jaxldm_dp            fastest Opacus DP mode / fastest jaxldm DP mode  (> 1: jaxldm faster)
  jaxldm_plain / torch_plain       jaxldm non-private / PyTorch plain               (< 1: jaxldm faster)
  jaxldm_dp / jaxldm_plain         jaxldm's own DP overhead
  opacus_dp / torch_plain          Opacus's own DP overhead

`--from-files A B` is the older comparison of two saved record files (`report.compare`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from jaxldm.config import ConfigError

INSTALL_HINT = "pip install -e '.[bench]'"
DP_JAX = ("vmap", "vmap_microbatch", "loop")
DP_TORCH = ("opacus_functorch", "opacus_hooks")


def torch_missing() -> list[str]:
  return [m for m in ("torch", "opacus") if importlib.util.find_spec(m) is None]


def load_twin():
  """jaxldm.bench.torch_twin, or a ConfigError naming the install command when torch/opacus are missing."""
  missing = torch_missing()
  if missing:
    raise ConfigError(f"the PyTorch/Opacus twin needs {' and '.join(missing)}, not installed: {INSTALL_HINT}")
  from jaxldm.bench import torch_twin
  return torch_twin


def run_twin(model: str, spec: str, overrides: Sequence[str], *, batches: Sequence[int], repeats: int,
             warmup: int, device: str = "", threads: int = 0, modes: Sequence[str] | None = None,
             timeout: float | None = None, keep_going: bool = False) -> list[dict]:
  """The twin's records, measured in a subprocess (see the module docstring)."""
  missing = torch_missing()
  if missing:
    raise ConfigError(f"the PyTorch/Opacus twin needs {' and '.join(missing)}, not installed: {INSTALL_HINT}")
  with tempfile.TemporaryDirectory(prefix="jaxldm_twin_") as tmp:
    out = os.path.join(tmp, "twin.json")
    cmd = [sys.executable, "-m", "jaxldm.bench.torch_twin", "--model", model, "--config", spec,
           "--batch", ",".join(map(str, batches)), "--repeats", str(repeats), "--warmup", str(warmup),
           "--json", out, *overrides]
    if device:
      cmd += ["--device", device]
    if threads:
      cmd += ["--threads", str(threads)]
    if modes:
      cmd += ["--modes", ",".join(modes)]
    if keep_going:
      cmd += ["--keep-going"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.pop("XLA_FLAGS", None)  # The twin's JAX only initialises parameters: one CPU device is enough.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and keep_going and os.path.exists(out):
      with open(out) as f:  # Every configuration failed: the records say how.
        return json.load(f)
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()
      raise RuntimeError(f"PyTorch/Opacus twin failed (exit {proc.returncode}): "
                         + (tail[-1] if tail else "no output"))
    with open(out) as f:
      return json.load(f)


def _fastest(records, modes):
  rs = [r for r in records if r["mode"] in modes and r.get("step_s")]
  return min(rs, key=lambda r: r["step_s"]) if rs else None


def ratios(jax_records: Sequence[dict], torch_records: Sequence[dict]) -> list[dict]:
  """One row per (model, batch) measured by both (see the module docstring)."""
  rows = []
  keys = dict.fromkeys((r["model"], r["batch"]) for r in jax_records)
  for model, batch in keys:
    j = [r for r in jax_records if (r["model"], r["batch"]) == (model, batch)]
    t = [r for r in torch_records if (r["model"], r["batch"]) == (model, batch)]
    if not t:
      continue
    jp, tp = _fastest(j, ("nonprivate",)), _fastest(t, ("nonprivate",))
    jd, td = _fastest(j, DP_JAX), _fastest(t, DP_TORCH)
    ratio = lambda a, b: a["step_s"] / b["step_s"] if a and b else None
    rows.append({
        "model": model, "batch": batch, "jaxldm_dp_mode": jd and jd["mode"], "opacus_dp_mode": td and td["mode"],
        "jaxldm_plain_s": jp and jp["step_s"], "jaxldm_dp_s": jd and jd["step_s"],
        "torch_plain_s": tp and tp["step_s"], "opacus_dp_s": td and td["step_s"],
        "opacus_dp_over_jaxldm_dp": ratio(td, jd), "jaxldm_plain_over_torch_plain": ratio(jp, tp),
        "jaxldm_dp_over_jaxldm_plain": ratio(jd, jp), "opacus_dp_over_torch_plain": ratio(td, tp),
        "jaxldm_params": j[0]["params"], "torch_params": t[0]["params"],
        "jaxldm_device": j[0]["device_kind"], "torch_device": t[0]["device_kind"],
        # Huge pages change XLA:CPU's step times (jaxldm/hostmem.py); records before session 13 lack it.
        "jaxldm_host_memory": j[0].get("host_memory"), "torch_host_memory": t[0].get("host_memory")})
  return rows


def ratio_table(rows: Sequence[dict], title: str = ""):
  from rich.table import Table

  ms = lambda v: "-" if v is None else f"{v * 1e3:,.1f}"
  x = lambda v: "-" if v is None else f"{v:.2f}"
  caption = "ms = median step; ratios of step times (same model, batch, inputs)"
  hosts = {r.get(k) for r in rows for k in ("jaxldm_host_memory", "torch_host_memory")} - {None}
  if hosts:
    caption += "; host memory: " + " / ".join(sorted(hosts))
  t = Table(title=title or None, caption=caption)
  for col in ("model", "B", "jaxldm plain ms", "jaxldm DP ms", "torch plain ms", "Opacus DP ms",
              "Opacus DP / jaxldm DP", "jaxldm plain / torch plain", "jaxldm DP / jaxldm plain",
              "Opacus DP / torch plain"):
    t.add_column(col, justify="left" if col == "model" else "right")
  for r in rows:
    t.add_row(r["model"], str(r["batch"]), ms(r["jaxldm_plain_s"]), f"{ms(r['jaxldm_dp_s'])} ({r['jaxldm_dp_mode']})",
              ms(r["torch_plain_s"]), f"{ms(r['opacus_dp_s'])} ({r['opacus_dp_mode']})",
              x(r["opacus_dp_over_jaxldm_dp"]), x(r["jaxldm_plain_over_torch_plain"]),
              x(r["jaxldm_dp_over_jaxldm_plain"]), x(r["opacus_dp_over_torch_plain"]))
  return t


def run(model: str, spec: str, overrides: Sequence[str] = (), *, batches: Sequence[int] = (8,),
        modes: Sequence[str] = ("nonprivate", "vmap", "vmap_microbatch"), microbatch: int = 0,
        repeats: int = 5, warmup: int = 2, device: str = "", threads: int = 0, progress=None) -> dict:
  """Both benchmarks back to back and their ratios: {"jaxldm": [...], "pytorch": [...], "ratios": [...]}."""
  from jaxldm.bench import grads

  grads.check_modes(modes)
  if progress:
    progress("PyTorch/Opacus twin (subprocess)")
  torch_records = run_twin(model, spec, overrides, batches=batches, repeats=repeats, warmup=warmup,
                           device=device, threads=threads)
  if progress:
    progress("jaxldm")
  target = grads.build_target(model, spec, overrides)
  jax_records = grads.run(target, batches=batches, modes=modes, microbatch=microbatch, repeats=repeats,
                          warmup=warmup, progress=progress)
  return {"kind": "jaxldm_bench_compare", "model": model, "config": spec, "overrides": list(overrides),
          "jaxldm": jax_records, "pytorch": torch_records, "ratios": ratios(jax_records, torch_records)}
