"""Where one compiled gradient step spends its time, operation by operation (`jaxldm bench profile`).

The step is `bench grads`' own program for one mode and batch. It is timed untraced first, then a few
calls run under `jax.profiler.trace`; every event whose name is an instruction of the compiled module
(a fusion, a library call, a copy, a loop) is summed per call and joined to that instruction's HLO:
output shape, the JAX operation it came from (`op_name`) and a kind (convolution, matmul, reduction,
copy, elementwise, control).

Read the sums as a ranking, not a budget: XLA:CPU runs independent operations side by side on its
threads (the event of an operation that overlapped others measures shared time), and some library
calls return before their work ends (the work then shows as a gap after their event). How this found
the attention block's strided copies: benchmarks/NOTES.md, session 20.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

import jax
import numpy as np

from jaxldm.bench import grads
from jaxldm.config import ConfigError

KINDS = ("convolution", "matmul", "reduction", "copy", "elementwise", "control")

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (\S+?) ([a-z][\w-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(\S+) \(.*\{$")


def hlo_instructions(text: str) -> dict[str, dict]:
  """{instruction name: {shape, opcode, op_name, kind}} of every instruction in an HLO module's text
  (`compiled.as_text()`; names are unique in a module), fusions classified by what their computation
  holds. The profiler's events carry the names of the instructions that run as operations."""
  bodies, current = {}, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      bodies[current] = []
      continue
    if current is not None:
      bodies[current].append(line)
  out, operands = {}, {}
  for lines in bodies.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, shape, opcode, rest = m.groups()
      op = re.search(r'op_name="([^"]*)"', rest)
      called = re.search(r"calls=%([\w.\-]+)", rest)
      body = "\n".join(bodies.get(called.group(1), ())) if called else ""
      if op is None and body:  # A library fusion carries it on its computation's root instead.
        root = next((b for b in body.splitlines() if "ROOT" in b), body)
        op = re.search(r'op_name="([^"]*)"', root) or re.search(r'op_name="([^"]*)"', body)
      out[name] = {"shape": shape.split("{")[0], "opcode": opcode, "op_name": op.group(1) if op else "",
                   "kind": _kind(name, opcode, body)}
      operands[name] = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
  for name, info in out.items():  # No metadata of its own (XLA drops it on library fusions): its inputs'.
    if not info["op_name"]:
      known = [out[o]["op_name"] for o in operands[name] if o in out and out[o]["op_name"]]
      info["op_name"] = f"(input) {known[0]}" if known else ""
  return out


def _kind(name: str, opcode: str, body: str) -> str:
  if opcode in ("while", "conditional", "call"):
    return "control"
  ops = set(re.findall(r"= \S+ ([a-z][\w-]*)\(", body)) | {opcode}
  if "convolution" in ops:
    return "convolution"
  if "dot" in ops:
    return "matmul"
  if "reduce" in ops or "reduce-window" in ops:
    return "reduction"
  if opcode in ("copy", "transpose") or "copy" in name or "transpose" in name:
    return "copy"
  return "elementwise"


def _trace_events(trace_dir: str) -> list[dict]:
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def check(mode: str, calls: int = 1) -> None:
  if mode not in grads.MODES:
    raise ConfigError(f"--mode: unknown mode {mode!r}; choose one of {', '.join(grads.MODES)}")
  if calls < 1:
    raise ConfigError(f"--calls {calls}: must be >= 1")


def profile(target: grads.Target, batch_size: int, mode: str, *, calls: int = 3, warmup: int = 2,
            microbatch: int = 0, trace_dir: str | None = None) -> dict[str, Any]:
  """Profiles `calls` calls of `mode`'s step at `batch_size`; returns the per-call summary (module doc)."""
  check(mode, calls)
  low = grads.lower(target, batch_size, [mode], microbatch=microbatch)
  compiled = low.lowered[mode].compile()
  args = (target.params, low.batch, low.rng)
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  instructions = hlo_instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    where = trace_dir or tmp
    with jax.profiler.trace(where, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    events = _trace_events(where)
  sums = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    if e.get("ph") == "X" and e.get("name") in instructions:
      sums[e["name"]][0] += 1
      sums[e["name"]][1] += float(e.get("dur", 0.0)) / 1e3  # Microseconds -> ms.
  ops = [{"name": name, **{k: v for k, v in instructions[name].items() if k != "opcode"},
          "count": n / calls, "ms": ms / calls} for name, (n, ms) in sums.items()]
  ops.sort(key=lambda r: -r["ms"])
  by_kind = {k: {"count": 0.0, "ms": 0.0} for k in KINDS}
  for r in ops:
    by_kind[r["kind"]]["count"] += r["count"]
    by_kind[r["kind"]]["ms"] += r["ms"]
  return {"kind": "profile", "model": target.model, "mode": mode, "batch": int(batch_size),
          "conv_weight_grad": low.conv_weight_grad, "calls": int(calls),
          "step_ms": float(np.median(times)) * 1e3,
          "operations_per_call": sum(r["count"] for r in ops), "operation_ms_per_call": sum(r["ms"] for r in ops),
          "by_kind": by_kind, "ops": ops, "device_kind": jax.devices()[0].device_kind,
          "backend": jax.default_backend(), "jax": jax.__version__}


def tables(result: dict, top: int = 25):
  """(per-kind table, top-`top` operations table) for a rich console."""
  from rich.table import Table

  title = (f"{result['model']} {result['mode']}, batch {result['batch']}: step {result['step_ms']:.1f} ms, "
           f"{result['operations_per_call']:.0f} operations")
  kinds = Table(title=title, caption="operation time sums overlapping work: a ranking, not a budget "
                                     "(jaxldm/bench/profile.py)")
  for col in ("kind", "operations", "ms per call", "share"):
    kinds.add_column(col, justify="left" if col == "kind" else "right")
  total = result["operation_ms_per_call"] or 1.0
  for kind, v in sorted(result["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
    if v["count"]:
      kinds.add_row(kind, f"{v['count']:.0f}", f"{v['ms']:.2f}", f"{v['ms'] / total:.0%}")
  ops = Table(title=f"the {min(top, len(result['ops']))} longest operations")
  for col in ("operation", "kind", "shape", "from (op_name)", "ms"):
    ops.add_column(col, justify="right" if col == "ms" else "left")
  for r in result["ops"][:top]:
    source = ("(input) " if r["op_name"].startswith("(input) ") else "") + "/".join(r["op_name"].split("/")[-3:])
    ops.add_row(r["name"], r["kind"], r["shape"], source, f"{r['ms']:.3f}")
  return kinds, ops
