"""`jaxldm bench gpu-check` (scripts/gpu_check.sh): the one-call GPU check of the DP gradient modes.

  bash scripts/gpu_check.sh                     # paper-size models on the GPU, time-bounded (--budget-s 450)
  bash scripts/gpu_check.sh --tiny --out /tmp/gc  # the same run end to end on a CPU, small models

Grid (paper size): the paper autoencoder and UNet (autoencoder:paper, ldm:paper)
at physical batch 8 and 32, float32 and bfloat16 compute (`model.dtype`), convolution kernel
gradient native (XLA's) and taps (`jaxldm.models.conv`), modes nonprivate / vmap / vmap_microbatch
(`jaxldm.bench.grads`). Per (model, batch, dtype, conv) every mode's program is compiled (XLA
compiles run in a thread pool, the next configuration's while this one's finish: `--compile-workers`),
then, once no compile is running (on a GPU XLA's autotuner runs kernels on the same device; records
carry `compiles_during_timing`, nonzero only where the budget's end cut the wait), the modes alternate
in each repeat. Every record carries XLA's memory plan (`memory`: temp/argument/output bytes),
the device's peak memory (`peak_bytes`, the process high-water mark so far: JAX cannot reset it),
XLA's flop counts and the achieved TFLOP/s (`tflops_per_s`: the compiled program's own count,
which on a GPU leaves out the convolutions XLA hands to cuDNN; `useful_tflops_per_s`: the
non-private program's count before compilation (`hlo_flops`, convolutions included, the same work
for every mode; on a GPU the CPU client analyses that HLO); XLA counts a loop body once, so a
microbatched program's own count is a lower bound), and each program's compile time (trace +
compile; on an H200 the paper-size programs took 50-210 s each, 2026-12-04, which is what bounds how
much of the grid a budget covers).

First, when torch and opacus are installed (and see CUDA, on a GPU), the PyTorch/Opacus twin
(float32; `jaxldm.bench.torch_twin`) times plain PyTorch and Opacus on the same device, in a
subprocess, within a fifth of the budget (it writes its records after each batch; what it did not
reach is named in the summary's `opacus_note`). It runs before JAX allocates on the device: JAX's
allocator keeps the grid's peak memory until the process ends, which could leave the twin too little
at batch 32.

A configuration that runs out of memory (or fails otherwise) is recorded with `status` "oom"
(or "error") and the check goes on. A time budget (`--budget-s`, default 450 s, the twin's time
included) bounds the run: configurations not compiled in time are recorded as "skipped", and so is
one whose compile, as long as the longest of its model's so far, would end past the budget (it is not
lowered only to be abandoned; a later, smaller configuration may still fit); one compiled in time but
timed past the budget's end gets one warm-up call and one repeat per mode (`times_s`). XLA cannot
stop a compile once started: the summary counts those still running at the end
(`abandoned_compiles`), and the `jaxldm` command then exits without waiting for them (Python joins
a thread pool's threads at exit: a paper-size compile would hold a lent device minutes longer). The grid is
ordered by priority (native kernel gradient before taps, bfloat16 before float32, batch 8 before
32, then UNet and autoencoder) so both models' most wanted rows run first.

With `--convs N`, before the grid (within a quarter of the budget the twin left): each model's N largest distinct
convolution layers timed batched vs per-example with XLA's and the CPU routes' kernel gradients
(`jaxldm.bench.convs`, first dtype and batch), into `<out>/<device>_<size>_convs.json` (and the summary's `conv_layers`).

Outputs: `<out>/<device>_<size>_jaxldm.json` (records, rewritten after every configuration),
`<out>/<device>_<size>_opacus.json`, `<out>/<device>_<size>_summary.json` (the whole check), and rows
appended to the results file (default benchmarks/RESULTS.md for paper size, <out>/RESULTS.md with
--tiny) under the heading "## GPU check".
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import functools
import json
import os
import pathlib
import re
import time
from collections.abc import Sequence

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError

MODES = ("nonprivate", "vmap", "vmap_microbatch")
# Shrunk :tiny configs for the CPU run (compiles dominate there; the grid is what is checked).
TINY_OVERRIDES = {
    "autoencoder": ["--config.data.shape=(2,8,8)", "--config.model.channels=(4,8)"],
    "unet": ["--config.data.shape=(2,8,8)", "--config.model.base_channels=4", "--config.model.context_dim=8"],
}
SIZES = {
    "paper": {"configs": {"unet": "ldm:paper", "autoencoder": "autoencoder:paper"},
              "overrides": {}, "batches": (8, 32), "repeats": 5, "warmup": 2, "budget_s": 450.0},
    "tiny": {"configs": {"unet": "ldm:tiny", "autoencoder": "autoencoder:tiny"},
             "overrides": TINY_OVERRIDES, "batches": (2, 4), "repeats": 2, "warmup": 1, "budget_s": 0.0},
}
HEADING = "## GPU check"
TWIN_SHARE = 0.2  # Of the budget, the most the PyTorch/Opacus twin may take (it runs first).
CONV_SHARE = 0.25  # Of what the twin left, the most `--convs N` may take (it runs before the grid).


def is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__} {e}".lower()
  return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory"))


def _failure(item: dict, mode: str, e: BaseException | None, status: str) -> dict:
  out = dict(item, mode=mode, status=status)
  if e is not None:
    out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
  return out


def device_slug(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def plan(models: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], convs: Sequence[str]) -> list[dict]:
  """The grid in priority order: conv, then dtype, then batch, then model (the order each is given in)."""
  return [{"model": m, "batch": b, "dtype": d, "conv": c}
          for c in convs for d in dtypes for b in batches for m in models]


def run(out_dir: str | pathlib.Path, *, size: str = "paper", models: Sequence[str] = ("unet", "autoencoder"),
        batches: Sequence[int] | None = None, dtypes: Sequence[str] = ("bfloat16", "float32"),
        convs: Sequence[str] = ("native", "taps"), modes: Sequence[str] = MODES, repeats: int | None = None,
        warmup: int | None = None, budget_s: float | None = None, opacus: bool = True,
        results: str | pathlib.Path | None = None, compile_workers: int = 0, conv_layers: int = 0,
        progress=None) -> dict:
  """Runs the check; returns the summary (also written to `<out>/<device>_<size>_summary.json`)."""
  # JAX takes 75% of a GPU's memory up front unless told otherwise (scripts/gpu_check.sh does): the twin's
  # process needs it. Effective only when this process has not used the GPU yet.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  from jaxldm.bench import grads
  from jaxldm.models import conv as conv_lib

  if size not in SIZES:
    raise ConfigError(f"gpu-check size {size!r}: choose one of {', '.join(SIZES)}")
  grads.check_modes(modes)
  for c in convs:
    if c not in ("native", "slices", "taps", "auto"):
      raise ConfigError(f"--conv {c!r}: choose from native, slices, taps, auto")
  spec = SIZES[size]
  batches = tuple(batches or spec["batches"])
  repeats = spec["repeats"] if repeats is None else repeats
  warmup = spec["warmup"] if warmup is None else warmup
  budget_s = spec["budget_s"] if budget_s is None else budget_s
  say = progress or (lambda msg: None)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0]
  backend = jax.default_backend()
  prefix = out_dir / f"{device_slug(device.device_kind)}_{size}"
  results = pathlib.Path(results) if results else (pathlib.Path("benchmarks/RESULTS.md") if size == "paper"
                                                   else out_dir / "RESULTS.md")
  start = time.perf_counter()
  twin_ok = opacus and _twin_available()
  workers = compile_workers or max(1, min(8, (os.cpu_count() or 2) // 2))

  # The twin first, in its own process, before JAX allocates on the device: JAX's allocator keeps the
  # grid's peak memory until this process ends, which could leave the twin too little at batch 32.
  twin_records: list[dict] = []
  twin_note = ""
  if not opacus:
    twin_note = "not asked for (--no-opacus)"
  elif not twin_ok:
    from jaxldm.bench.compare import INSTALL_HINT
    twin_note = f"torch/opacus not installed ({INSTALL_HINT})"
  else:
    twin_records, twin_note = _run_twin(spec, models, batches, repeats, warmup, backend,
                                        budget_s * TWIN_SHARE if budget_s > 0 else None, say)
    _save(pathlib.Path(f"{prefix}_opacus.json"), twin_records)
  jax_deadline = start + budget_s if budget_s > 0 else float("inf")

  items = plan(models, batches, dtypes, convs)
  targets: dict = {}

  def target_for(item):
    key = (item["model"], item["dtype"])
    if key not in targets:
      model = item["model"]
      overrides = list(spec["overrides"].get(model, ())) + [f"--config.model.dtype={item['dtype']}"]
      targets[key] = grads.build_target(model, spec["configs"][model], overrides)
    return targets[key]

  conv_records: list[dict] = []
  if conv_layers > 0:  # Per-layer breakdown first (`jaxldm bench convs`): where the private step's cost sits.
    from jaxldm.bench import convs as conv_bench  # (`convs` is this function's kernel-gradient list.)
    now = time.perf_counter()
    conv_deadline = now + (jax_deadline - now) * CONV_SHARE  # The grid keeps the rest.
    for model in models:
      say(f"{model}: the {conv_layers} largest convolution layers, batched vs per-example (native, slices, taps)")
      try:
        conv_records += conv_bench.run(target_for({"model": model, "dtype": dtypes[0]}), batches[0],
                                       max_layers=conv_layers, repeats=repeats, warmup=warmup,
                                       deadline=conv_deadline)
      except Exception as e:  # Recorded, not fatal: the grid still runs.
        conv_records.append({"model": model, "status": "oom" if is_oom(e) else "error",
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
      _save(pathlib.Path(f"{prefix}_convs.json"), conv_records)

  records: list[dict] = []
  jax_path = pathlib.Path(f"{prefix}_jaxldm.json")
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  pending: collections.deque = collections.deque()  # (item, Lowered or exception, {mode: future})
  queue = collections.deque(items)
  unfinished: set = set()  # Compile futures not done yet.
  compile_seen: dict = {}  # model -> the longest compile of its programs so far (s).

  def note_compile(model, future):
    if not future.cancelled() and future.exception() is None:
      compile_seen[model] = max(compile_seen.get(model, 0.0), future.result()[1])

  def too_late(item) -> bool:
    """Whether the item's compile, as long as its model's longest so far, would end past the deadline."""
    return time.perf_counter() + compile_seen.get(item["model"], 0.0) >= jax_deadline

  def base(item):
    return {"model": item["model"], "batch": item["batch"], "dtype": item["dtype"],
            "conv_weight_grad": item["conv"], "size": size, "config": spec["configs"][item["model"]],
            "backend": backend, "device_kind": device.device_kind,
            "date": datetime.date.today().isoformat(), "jax": jax.__version__}

  def submit_next():
    item = queue.popleft()
    try:
      with conv_lib.weight_grad(item["conv"]):
        low = grads.lower(target_for(item), item["batch"], modes)
      futures = {m: pool.submit(grads.compile_timed, low.lowered[m]) for m in modes}
      for f in futures.values():  # Tracked until done (a done one holds a compiled program: not kept).
        unfinished.add(f)
        f.add_done_callback(unfinished.discard)
        f.add_done_callback(functools.partial(note_compile, item["model"]))
      pending.append((item, low, futures))
    except Exception as e:  # Tracing failed (shapes, memory for the inputs): recorded, not fatal.
      pending.append((item, e, {}))

  try:
    while queue or pending:
      while queue and len(pending) < 2 and time.perf_counter() < jax_deadline:  # One configuration ahead.
        if too_late(queue[0]):  # Not lowered and compiled only to be abandoned: the next may fit.
          item = queue.popleft()
          why = (f"not started: compiling it (~{compile_seen[item['model']]:.0f} s for this model so far) "
                 "would end past the time budget")
          say(f"{item['model']} B={item['batch']} {item['dtype']} conv {item['conv']}: {why}")
          records += [dict(_failure(base(item), m, None, "skipped"), error=why) for m in modes]
          continue
        submit_next()
      if not pending:
        break
      item, low, futures = pending.popleft()
      say(f"{item['model']} B={item['batch']} {item['dtype']} conv {item['conv']}")
      if isinstance(low, Exception):
        records += [_failure(base(item), m, low, "oom" if is_oom(low) else "error") for m in modes]
      else:
        others = lambda: [f for f in list(unfinished) if f not in futures.values()]
        records += _measure_item(grads, base(item), low, futures, modes, repeats, warmup, jax_deadline, others)
      del low, futures
      _save(jax_path, records)
    for item in queue:  # Not started within the budget.
      records += [_failure(base(item), m, None, "skipped") for m in modes]
  finally:  # Queued compiles are cancelled; running ones cannot be (see `abandoned_compiles`).
    pool.shutdown(wait=False, cancel_futures=True)
    abandoned = sum(f.running() for f in list(unfinished))
  _save(jax_path, records)
  targets.clear()

  summary = {"kind": "jaxldm_gpu_check", "size": size, "device_kind": device.device_kind, "backend": backend,
             "date": datetime.date.today().isoformat(), "jax": jax.__version__, "models": list(models),
             "batches": list(batches), "dtypes": list(dtypes), "convs": list(convs), "modes": list(modes),
             "repeats": repeats, "warmup": warmup, "budget_s": budget_s, "compile_workers": workers,
             "wall_s": time.perf_counter() - start, "jaxldm": records, "conv_layers": conv_records,
             "abandoned_compiles": abandoned,
             "opacus": twin_records,
             "opacus_note": twin_note, "files": {"jaxldm": str(jax_path), "results": str(results)}}
  _save(pathlib.Path(f"{prefix}_summary.json"), summary)
  append_results(results, summary)
  return summary


def _measure_item(grads, base: dict, low, futures: dict, modes, repeats, warmup, deadline,
                  others=lambda: []) -> list[dict]:
  """Waits for the item's compiles, then for the other configurations' (`others()`: the one compiled
  ahead), then times it: a compile running beside the timed steps takes CPU threads, and on a GPU XLA's
  autotuner runs its candidate kernels and allocates memory on the same device. Neither wait goes past
  the deadline; the compiles still running when the timing starts are each record's `compiles_during_timing`."""
  left = lambda: None if deadline == float("inf") else max(0.0, deadline - time.perf_counter())
  compiled, compile_s, failed = {}, {}, []
  for m in modes:
    try:  # Waits for the compile only until the deadline (paper-size compiles ran 50-210 s on an H200).
      compiled[m], compile_s[m] = futures[m].result(timeout=left())
    except concurrent.futures.TimeoutError:
      failed.append(dict(_failure(base, m, None, "skipped"), error="still compiling at the time budget's end"))
    except Exception as e:
      failed.append(_failure(base, m, e, "oom" if is_oom(e) else "error"))
  if not compiled:
    return failed
  running = others()
  if running:
    concurrent.futures.wait(running, timeout=left())
  base = dict(base, compiles_during_timing=sum(not f.done() for f in running))
  # Compiled in time: timed even just past the deadline (on a GPU warm-up + repeats cost seconds), but
  # past it with one warm-up call and one repeat per mode (on a CPU a paper-size step takes a minute).
  try:
    recs = grads.measure(low, compiled, compile_s, repeats=repeats, warmup=warmup, deadline=deadline)
  except Exception as e:
    if not is_oom(e) or len(compiled) == 1:
      return failed + [_failure(base, m, e, "oom" if is_oom(e) else "error") for m in compiled]
    recs = []  # Together they did not fit: each mode alone (the ratio is then across timings).
    for m in compiled:
      try:
        recs += grads.measure(low, {m: compiled[m]}, compile_s, repeats=repeats, warmup=warmup, deadline=deadline)
      except Exception as e2:
        failed.append(_failure(base, m, e2, "oom" if is_oom(e2) else "error"))
    grads._add_ratios(recs)
  return failed + [dict(base, **r, status="ok") for r in recs]


def _twin_available() -> bool:
  from jaxldm.bench.compare import torch_missing
  return not torch_missing()


def _run_twin(spec, models, batches, repeats, warmup, backend, budget_s, say) -> tuple[list, str]:
  """The twin's records for each model, within `budget_s` seconds in all (None: no limit; each model
may take an equal part of what is left), and a note on what it did not measure."""
  from jaxldm.bench.compare import run_twin

  device = "cuda" if backend == "gpu" else "cpu"
  deadline = None if budget_s is None else time.perf_counter() + budget_s
  out, notes = [], []
  for i, model in enumerate(models):
    left = None if deadline is None else (deadline - time.perf_counter()) / (len(models) - i)
    if left is not None and left < 10:
      notes.append(f"{model}: skipped (time budget)")
      continue
    say(f"PyTorch/Opacus twin: {model} on {device}")
    try:
      recs = run_twin(model, spec["configs"][model], spec["overrides"].get(model, ()), batches=batches,
                      repeats=repeats, warmup=warmup, device=device, timeout=left, keep_going=True)
    except Exception as e:
      notes.append(f"{model}: {type(e).__name__}: {str(e)[:300]}")
      continue
    out += [dict(r, size=spec["configs"][model].rsplit(":", 1)[-1], status=r.get("status", "ok")) for r in recs]
    missing = [b for b in batches if not any(r.get("batch") == b for r in recs)]
    if missing:  # Stopped at its share of the budget (records are written after each batch).
      notes.append(f"{model}: batch {', '.join(map(str, missing))} not reached in the time budget")
  return out, "; ".join(notes)


def _save(path: pathlib.Path, obj) -> None:
  from jaxldm.bench.report import save_json
  save_json(path, obj)


# ---------------------------------------------------------------------------------------------
# RESULTS.md rows
# ---------------------------------------------------------------------------------------------
def _mib(n) -> str:
  if n is None:
    return "-"
  return f"{n / 2**20:,.0f}" if n >= 10 * 2**20 else f"{n / 2**20:.2g}"


def rows_markdown(summary: dict) -> str:
  """The check as a markdown block: one row per (model, batch, dtype, conv, mode), then Opacus."""
  when = summary["date"]
  lines = [f"### {when}: {summary['device_kind']} ({summary['backend']}), {summary['size']} models, "
           f"jax {summary['jax']}, {summary['repeats']} repeats, {summary['wall_s']:.0f} s wall",
           "",
           "| model | B | dtype | conv grad | mode | step ms | x nonprivate | useful TFLOP/s | XLA TFLOP/s "
           "| XLA temp MiB | device peak MiB | compile s | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in summary["jaxldm"]:
    ok = r.get("status") == "ok"
    mem = r.get("memory") or {}
    f = lambda v, fmt: fmt.format(v) if ok and v is not None else "-"
    lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['conv_weight_grad']} | {r['mode']} | "
                 f"{f(r.get('step_s') and r['step_s'] * 1e3, '{:,.1f}')} | {f(r.get('ratio_to_nonprivate'), '{:.3f}')} | "
                 f"{f(r.get('useful_tflops_per_s'), '{:.3g}')} | {f(r.get('tflops_per_s'), '{:.3g}')} | "
                 f"{_mib(mem.get('temp_bytes')) if ok else '-'} | {_mib(r.get('peak_bytes')) if ok else '-'} | "
                 f"{f(r.get('compile_s'), '{:.0f}')} | {r.get('status', 'ok')} |")
  from jaxldm.bench import convs as convs_lib

  conv_ok = [r for r in summary.get("conv_layers", []) if "step_s" in r]
  per_example = [v for v in convs_lib.JAX_VARIANTS if not v.startswith("batched")]
  if conv_ok:
    lines += ["", f"Convolution layers (`jaxldm bench convs`, {conv_ok[0]['dtype']}, batch {conv_ok[0]['batch']}; "
              f"backward of one layer, ms; {'/'.join(per_example)}: per-example kernel gradients):", "",
              "| model | layer | count | " + " | ".join(v.replace("_", " ") for v in convs_lib.JAX_VARIANTS)
              + " | " + " | ".join(f"{v} / batched" for v in per_example) + " |",
              "|---|---|---|" + "---|" * (len(convs_lib.JAX_VARIANTS) + len(per_example))]
    for r in conv_ok:
      ms = [f"{r['step_s'][v] * 1e3:,.2f}" if v in r["step_s"] else "-" for v in convs_lib.JAX_VARIANTS]
      ratio = [f"{r['ratio_to_batched'][v]:.2f}" if v in r.get("ratio_to_batched", {}) else "-"
               for v in per_example]
      lines.append(f"| {r['model']} | {r['layer']} | {r['count']} | " + " | ".join(ms + ratio) + " |")
  if summary["opacus"]:
    lines += ["", "PyTorch/Opacus twin (float32, same device):", "",
              "| model | B | mode | step ms | x plain | peak MiB | status |", "|---|---|---|---|---|---|---|"]
    for r in summary["opacus"]:
      ok = r.get("status", "ok") == "ok"
      step = f"{r['step_s'] * 1e3:,.1f}" if ok and r.get("step_s") else "-"
      ratio = f"{r['ratio_to_nonprivate']:.2f}" if ok and r.get("ratio_to_nonprivate") else "-"
      lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {step} | {ratio} | "
                   f"{_mib(r.get('peak_bytes')) if ok else '-'} | {r.get('status', 'ok')} |")
  if summary.get("abandoned_compiles"):
    lines += ["", f"{summary['abandoned_compiles']} compile(s) still running at the budget's end were abandoned "
              "(the command exits without waiting for them)."]
  if summary.get("opacus_note"):
    lines += ["", f"Opacus twin: {summary['opacus_note']}."]
  return "\n".join(lines) + "\n"


def append_results(path: str | pathlib.Path, summary: dict) -> None:
  """Appends the check's rows at the end of the "## GPU check" section (made if absent)."""
  path = pathlib.Path(path)
  text = path.read_text() if path.is_file() else "# Benchmark results\n"
  block = rows_markdown(summary)
  lines = text.splitlines(keepends=True)
  at = next((i for i, line in enumerate(lines) if line.startswith(HEADING)), None)
  if at is None:
    text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}"
  else:
    end = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head, tail = "".join(lines[:end]).rstrip("\n"), "".join(lines[end:])
    text = f"{head}\n\n{block}" + (f"\n{tail}" if tail else "")
  with atomic_open(path, "w") as f:
    f.write(text)
