"""`jaxldm bench compare`: jaxldm and its PyTorch/Opacus twin on the same model and batch, one command.

  jaxldm bench compare --model unet --config ldm:tiny --batch 8 --json compare.json

The twin (`jaxldm.bench.torch_twin`) runs first, in a subprocess (its own threads and GPU memory;
JAX there stays on the CPU, it only counts parameters), then jaxldm in this process. Ratios, per
(model, batch), each > 1 meaning "jaxldm is that many times faster" where it says so:

  opacus_dp / jaxldm_dp            fastest Opacus DP mode / fastest jaxldm DP mode  (> 1: jaxldm faster)
  jaxldm_plain / torch_plain       jaxldm non-private / PyTorch plain               (< 1: jaxldm faster)
  jaxldm_dp / jaxldm_plain         jaxldm's own DP overhead
  opacus_dp / torch_plain          Opacus's own DP overhead

`--rounds N` (N > 1) measures both sides N times, each time in fresh processes (jaxldm through
`jaxldm bench grads` in a subprocess, under the same environment as the twin), alternating which side
goes first, and reports per (model, batch) the median of each round's ratio with its min-max range. On a
shared or noisy CPU one process can run every step ~25% slower than the next (benchmarks/NOTES.md,
session 14): a single round's ratios can move that much, the median of 3-5 rounds much less.

`--from-files A B` is the older comparison of two saved record files (`report.compare`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

from jaxldm.config import ConfigError

INSTALL_HINT = "pip install -e '.[bench]'"
DP_JAX = ("vmap", "vmap_microbatch", "loop")
DP_TORCH = ("opacus_functorch", "opacus_hooks")
RATIOS = ("opacus_dp_over_jaxldm_dp", "jaxldm_plain_over_torch_plain", "jaxldm_dp_over_jaxldm_plain",
          "opacus_dp_over_torch_plain")
TIMES = ("jaxldm_plain_s", "jaxldm_dp_s", "torch_plain_s", "opacus_dp_s")


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
             timeout: float | None = None, keep_going: bool = False,
             environ: Mapping[str, str] | None = None) -> list[dict]:
  """The twin's records, measured in a subprocess (see the module docstring); `environ`: its
  environment (default this process's)."""
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
    env = dict(os.environ if environ is None else environ, JAX_PLATFORMS="cpu",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.pop("XLA_FLAGS", None)  # The twin's JAX only initialises parameters: one CPU device is enough.
    return _records_from(cmd, out, env, "PyTorch/Opacus twin", timeout=timeout, keep_going=keep_going)


def run_jaxldm(model: str, spec: str, overrides: Sequence[str], *, batches: Sequence[int],
               modes: Sequence[str], microbatch: int, repeats: int, warmup: int,
               environ: Mapping[str, str] | None = None) -> list[dict]:
  """jaxldm's records measured in a fresh process (`jaxldm bench grads`), as each round of `--rounds` does."""
  with tempfile.TemporaryDirectory(prefix="jaxldm_grads_") as tmp:
    out = os.path.join(tmp, "grads.json")
    cmd = [sys.executable, "-m", "jaxldm.cli", "bench", "grads", "--model", model, "--config", spec,
           "--batch", ",".join(map(str, batches)), "--modes", ",".join(modes), "--microbatch", str(microbatch),
           "--repeats", str(repeats), "--warmup", str(warmup), "--json", out,
           "--png", os.path.join(tmp, "grads.png"), *overrides]
    return _records_from(cmd, out, dict(os.environ if environ is None else environ), "jaxldm bench grads")


def _records_from(cmd, out: str, env, what: str, *, timeout: float | None = None, keep_going: bool = False) -> list[dict]:
  """Runs `cmd` (a benchmark that writes its records to `out`) and returns them; a failure raises
  RuntimeError naming `what`, the exit code and its last line of output (with keep_going, the records
  written before a failure or before `timeout` stopped it are returned instead: a failure's say how it
  failed, a timeout's lack the configurations not reached)."""
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:  # Stopped at the time limit: what it measured before (written after each batch).
    if not (keep_going and os.path.exists(out)):
      raise
  else:
    if proc.returncode != 0 and not (keep_going and os.path.exists(out)):
      tail = (proc.stderr or proc.stdout).strip().splitlines()
      raise RuntimeError(f"{what} failed (exit {proc.returncode}): " + (tail[-1] if tail else "no output"))
  with open(out) as f:
    return json.load(f)


def rounds_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of both sides' processes in `--rounds`: this one's, plus the huge-page tunable where
  the `jaxldm` command would set it for itself (jaxldm/hostmem.py), so a round measures what the command
  measures whether it was started from the shell or from Python."""
  from jaxldm import hostmem

  environ = dict(os.environ if environ is None else environ)
  if hostmem.would_help(environ, mode=hostmem.thp_mode(), glibc=hostmem.glibc_version(), system=platform.system()):
    return hostmem.with_tunable(environ)
  return environ


def summarize(per_round: Sequence[Sequence[dict]]) -> list[dict]:
  """One row per (model, batch) found in every round: each step time and ratio the median over rounds,
  each ratio's [min, max] under "<ratio>_range", the rounds' DP modes, and "rounds"."""
  rows = []
  for first in per_round[0]:
    key = (first["model"], first["batch"])
    same = [next((r for r in rows_ if (r["model"], r["batch"]) == key), None) for rows_ in per_round]
    if any(r is None for r in same):
      continue
    row = dict(first, rounds=len(same))
    for name in TIMES + RATIOS:
      values = [r[name] for r in same if r.get(name) is not None]
      row[name] = statistics.median(values) if values else None
      if name in RATIOS:
        row[f"{name}_range"] = [min(values), max(values)] if values else None
    for name in ("jaxldm_dp_mode", "opacus_dp_mode"):
      row[name] = "/".join(dict.fromkeys(str(r[name]) for r in same))
    rows.append(row)
  return rows


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
  caption = "ms = median step; ratios of step times (same model, batch, inputs)"
  rounds = max((r.get("rounds", 1) for r in rows), default=1)
  if rounds > 1:
    caption += f"; ratios: median of {rounds} rounds (fresh processes each), min-max below it"
  hosts = {r.get(k) for r in rows for k in ("jaxldm_host_memory", "torch_host_memory")} - {None}
  if hosts:
    caption += "; host memory: " + " / ".join(sorted(hosts))
  t = Table(title=title or None, caption=caption)
  for col in ("model", "B", "jaxldm plain ms", "jaxldm DP ms", "torch plain ms", "Opacus DP ms",
              "Opacus DP / jaxldm DP", "jaxldm plain / torch plain", "jaxldm DP / jaxldm plain",
              "Opacus DP / torch plain"):
    t.add_column(col, justify="left" if col == "model" else "right")
  for r in rows:
    def x(name):
      v, span = r[name], r.get(f"{name}_range")
      if v is None:
        return "-"
      return f"{v:.2f}\n{span[0]:.2f}-{span[1]:.2f}" if span else f"{v:.2f}"  # The range on its own line.
    t.add_row(r["model"], str(r["batch"]), ms(r["jaxldm_plain_s"]), f"{ms(r['jaxldm_dp_s'])} ({r['jaxldm_dp_mode']})",
              ms(r["torch_plain_s"]), f"{ms(r['opacus_dp_s'])} ({r['opacus_dp_mode']})",
              *(x(name) for name in RATIOS))
  return t


def rounds_table(per_round: Sequence[dict], title: str = ""):
  """Each round's ratios, a row per (round, model, batch): how much they move between processes."""
  from rich.table import Table

  t = Table(title=title or None, caption="each round: both sides in fresh processes, the first listed ran first")
  for col in ("round", "first", "model", "B", "Opacus DP / jaxldm DP", "jaxldm plain / torch plain",
              "jaxldm DP / jaxldm plain", "Opacus DP / torch plain"):
    t.add_column(col, justify="left" if col in ("first", "model") else "right")
  for rnd in per_round:
    for r in rnd["ratios"]:
      t.add_row(str(rnd["round"] + 1), rnd["order"][0], r["model"], str(r["batch"]),
                *("-" if r[name] is None else f"{r[name]:.2f}" for name in RATIOS))
  return t


def run(model: str, spec: str, overrides: Sequence[str] = (), *, batches: Sequence[int] = (8,),
        modes: Sequence[str] = ("nonprivate", "vmap", "vmap_microbatch"), microbatch: int = 0,
        repeats: int = 5, warmup: int = 2, device: str = "", threads: int = 0, rounds: int = 1,
        progress=None) -> dict:
  """Both benchmarks back to back and their ratios: {"jaxldm": [...], "pytorch": [...], "ratios": [...]}.

  rounds > 1: both sides in fresh processes per round, alternating which goes first; "ratios" are the
  medians over rounds (`summarize`), "rounds" each round's records and ratios, and every record in
  "jaxldm" / "pytorch" carries its "round"."""
  from jaxldm.bench import grads

  grads.check_modes(modes)
  if rounds < 1:
    raise ConfigError(f"--rounds {rounds}: give 1 or more")
  if rounds > 1:
    return _run_rounds(model, spec, overrides, batches=batches, modes=modes, microbatch=microbatch,
                       repeats=repeats, warmup=warmup, device=device, threads=threads, rounds=rounds,
                       progress=progress)
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


def _run_rounds(model, spec, overrides, *, batches, modes, microbatch, repeats, warmup, device, threads, rounds,
                progress) -> dict:
  environ = rounds_environ()
  sides = {
      "pytorch": lambda: run_twin(model, spec, overrides, batches=batches, repeats=repeats, warmup=warmup,
                                  device=device, threads=threads, environ=environ),
      "jaxldm": lambda: run_jaxldm(model, spec, overrides, batches=batches, modes=modes, microbatch=microbatch,
                                   repeats=repeats, warmup=warmup, environ=environ),
  }
  per_round, jax_all, torch_all = [], [], []
  for i in range(rounds):
    order = ["pytorch", "jaxldm"] if i % 2 == 0 else ["jaxldm", "pytorch"]  # Drift hits both sides alike.
    got = {}
    for side in order:
      if progress:
        progress(f"round {i + 1}/{rounds}: {'PyTorch/Opacus twin' if side == 'pytorch' else 'jaxldm'} (subprocess)")
      got[side] = [dict(r, round=i) for r in sides[side]()]
    rows = ratios(got["jaxldm"], got["pytorch"])
    per_round.append({"round": i, "order": order, "jaxldm": got["jaxldm"], "pytorch": got["pytorch"], "ratios": rows})
    jax_all += got["jaxldm"]
    torch_all += got["pytorch"]
  return {"kind": "jaxldm_bench_compare", "model": model, "config": spec, "overrides": list(overrides),
          "jaxldm": jax_all, "pytorch": torch_all, "ratios": summarize([r["ratios"] for r in per_round]),
          "rounds": per_round}
