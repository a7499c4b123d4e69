"""`jaxldm bench gpu-check` end to end on the CPU (the --tiny run): records, memory, flops, RESULTS rows."""

import json
import os
import shutil
import subprocess

import pytest

from jaxldm import cli
from jaxldm.bench import gpu_check

RESULTS = "benchmarks/RESULTS.md"


def test_tiny_check_end_to_end(tmp_path, capsys):
  results = tmp_path / "RESULTS.md"
  shutil.copy(RESULTS, results)  # Rows go to a copy, never to the real file.
  before = results.read_text()
  out = tmp_path / "gc"
  # bfloat16 only: float32 configurations run in the tests below (each grid program is ~1.7 s to trace,
  # lower and load here); the grid's make-up for the default dtypes is test_plan_is_the_issue_grid's.
  code = cli.main(["bench", "gpu-check", "--tiny", "--out", str(out), "--results", str(results),
                   "--models", "autoencoder", "--batch", "2", "--dtypes", "bfloat16", "--modes", "nonprivate,vmap",
                   "--repeats", "1", "--warmup", "0", "--no-opacus", "--compile-workers", "2", "--convs", "1"])
  assert code == 0
  summary = json.loads((out / "cpu_tiny_summary.json").read_text())
  records = json.loads((out / "cpu_tiny_jaxldm.json").read_text())
  assert records == summary["jaxldm"]
  grid = {(r["dtype"], r["conv_weight_grad"], r["mode"]) for r in records}
  assert grid == {("bfloat16", c, m) for c in ("native", "taps") for m in ("nonprivate", "vmap")}
  for r in records:
    assert r["status"] == "ok", r
    assert r["model"] == "autoencoder" and r["batch"] == 2 and r["size"] == "tiny"
    assert r["step_s"] > 0 and len(r["times_s"]) == 1 and r["compile_s"] > 0
    assert r["memory"]["temp_bytes"] > 0 and r["memory"]["argument_bytes"] > 0  # XLA's memory plan.
    assert r["program_bytes"] > 0 and r["peak_bytes"] > 0
    assert r["flops"] > 0 and r["tflops_per_s"] > 0  # XLA's cost analysis / time.
    assert r["useful_flops"] > 0 and r["useful_tflops_per_s"] > 0
  ratios = {(r["dtype"], r["conv_weight_grad"]): r["ratio_to_nonprivate"] for r in records if r["mode"] == "nonprivate"}
  assert set(ratios.values()) == {1.0}
  assert summary["opacus"] == [] and "not asked" in summary["opacus_note"]
  # --convs 1: the autoencoder's largest convolution, batched vs per-example (first dtype, first batch).
  conv = json.loads((out / "cpu_tiny_convs.json").read_text())
  assert conv == summary["conv_layers"] and len(conv) == 1
  assert summary["convs"] == ["native", "taps"]  # The grid's kernel gradients, not the layer records.
  assert conv[0]["model"] == "autoencoder" and conv[0]["batch"] == 2 and conv[0]["dtype"] == "bfloat16"
  assert set(conv[0]["step_s"]) == {"batched", "batched_slices", "batched_taps", "native", "slices", "taps"}

  text = results.read_text()
  assert text.startswith(before.rstrip("\n")[:200])
  section = text[text.index(gpu_check.HEADING):]
  rows = [line for line in section.splitlines() if line.startswith("| autoencoder | 2 |")]
  assert len(rows) == 4 and all(line.endswith("| ok |") for line in rows)
  assert "x nonprivate" in section and "useful TFLOP/s" in section
  assert f"| autoencoder | {conv[0]['layer']} | {conv[0]['count']} |" in section
  (layer_row,) = [line for line in section.splitlines() if line.startswith(f"| autoencoder | {conv[0]['layer']} |")]
  assert layer_row.count("|") == 1 + 3 + 6 + 3  # model, layer, count; six JAX variants; three per-example ratios.
  assert "autoencoder" in capsys.readouterr().out


def test_failures_are_recorded_not_fatal(tmp_path, monkeypatch):
  """An out-of-memory configuration becomes status "oom"; a spent budget marks the rest "skipped"."""
  from jaxldm.bench import grads

  def boom(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes")
  monkeypatch.setattr(grads, "lower", boom)
  summary = gpu_check.run(tmp_path, size="tiny", models=("autoencoder",), batches=(2,), dtypes=("float32",),
                          convs=("taps",), modes=("nonprivate", "vmap"), opacus=False,
                          results=tmp_path / "R.md")
  assert [r["status"] for r in summary["jaxldm"]] == ["oom", "oom"]
  assert "RESOURCE_EXHAUSTED" in summary["jaxldm"][0]["error"]
  assert "| oom |" in (tmp_path / "R.md").read_text()

  skipped = gpu_check.run(tmp_path, size="tiny", models=("autoencoder",), batches=(2,), dtypes=("float32",),
                          convs=("taps",), modes=("nonprivate",), opacus=False, budget_s=1e-9,
                          results=tmp_path / "R.md")
  assert [r["status"] for r in skipped["jaxldm"]] == ["skipped"]


def test_results_rows_go_under_the_gpu_heading(tmp_path):
  path = tmp_path / "R.md"
  path.write_text(f"# Results\n\n{gpu_check.HEADING}\n\nNot yet run.\n\n## Later section\n\ntext\n")
  summary = {"date": "2026-01-01", "device_kind": "NVIDIA H200", "backend": "gpu", "size": "paper", "jax": "0",
             "repeats": 5, "wall_s": 1.0, "opacus": [], "opacus_note": "",
             "jaxldm": [{"model": "unet", "batch": 8, "dtype": "bfloat16", "conv_weight_grad": "native",
                         "mode": "vmap", "status": "oom"}]}
  gpu_check.append_results(path, summary)
  text = path.read_text()
  assert text.index("Not yet run.") < text.index("| unet | 8 | bfloat16 | native | vmap |") < text.index("## Later")


def test_plan_is_the_issue_grid():
  defaults = cli.build_parser().parse_args(["bench", "gpu-check"])
  assert defaults.dtypes == ("bfloat16", "float32") and defaults.models == ("unet", "autoencoder")
  assert defaults.conv == ("native", "taps")
  grid = gpu_check.plan(("unet", "autoencoder"), (8, 32), ("bfloat16", "float32"), ("native", "taps"))
  assert len(grid) == 16 and grid[0] == {"model": "unet", "batch": 8, "dtype": "bfloat16", "conv": "native"}
  # Both models' bfloat16 native rows at both batches before any float32 or taps row.
  assert [(g["model"], g["batch"]) for g in grid[:4]] == [("unet", 8), ("autoencoder", 8), ("unet", 32),
                                                          ("autoencoder", 32)]
  assert {(g["dtype"], g["conv"]) for g in grid[:4]} == {("bfloat16", "native")}
  assert {g["conv"] for g in grid[8:]} == {"taps"}
  assert gpu_check.SIZES["paper"]["configs"] == {"unet": "ldm:paper",
                                                 "autoencoder": "autoencoder:paper"}
  assert gpu_check.SIZES["paper"]["batches"] == (8, 32)


def test_script_reaches_the_cli():
  if not shutil.which("bash"):
    pytest.skip("no bash")
  # The script's own choice of interpreter (the repository's .venv here), whatever PYTHON the caller's
  # shell may hold.
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], capture_output=True, text=True, timeout=120,
                        env=env)
  assert proc.returncode == 0, proc.stderr
  assert "--tiny" in proc.stdout and "--budget-s" in proc.stdout


def test_hlo_flops_count_a_convolution():
  """`useful_flops` counts convolutions (the GPU's compiled count leaves out cuDNN's): 2 x MACs."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  from jaxldm.bench import grads

  x, w = jnp.ones((2, 4, 8, 8, 3)), jnp.ones((3, 3, 3, 3, 5))
  conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1, 1), "VALID",
                                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))
  out_voxels = 2 * 6 * 6  # (4-2) x (8-2) x (8-2) per example.
  want = 2 * 2 * out_voxels * 3 * 5 * 27
  assert grads.hlo_flops(conv.lower(x, w)) == want
  assert grads.hlo_flops(object()) is None  # No cost analysis: None, not an error.

  class PluginLowered:
    """A Lowered as JAX gives it on a PJRT C API plugin (CUDA): no cost analysis before compiling."""
    def __init__(self, lowered):
      self.lowered = lowered

    def cost_analysis(self):
      raise NotImplementedError("Lowered.cost_analysis not implemented on platform 'cuda'")

    def compiler_ir(self, dialect):
      return self.lowered.compiler_ir(dialect)

  assert grads.hlo_flops(PluginLowered(conv.lower(x, w))) == want  # The CPU client's count of the same HLO.


def test_budget_does_not_wait_for_slow_compiles(tmp_path, monkeypatch):
  """At the budget's end a configuration still compiling is recorded "skipped", without waiting."""
  import threading
  import time

  from jaxldm.bench import grads

  release = threading.Event()

  def slow_compile(lowered):
    release.wait(60)  # A paper-size compile: far longer than the budget.
    return lowered.compile(), 0.0
  monkeypatch.setattr(grads, "compile_timed", slow_compile)
  t0 = time.perf_counter()
  try:
    summary = gpu_check.run(tmp_path, size="tiny", models=("autoencoder",), batches=(2,), dtypes=("float32",),
                            convs=("native",), modes=("nonprivate",), opacus=False, budget_s=3.0,
                            results=tmp_path / "R.md")
    waited = time.perf_counter() - t0
  finally:
    release.set()
  assert [r["status"] for r in summary["jaxldm"]] == ["skipped"]
  assert "still compiling" in summary["jaxldm"][0]["error"]
  assert waited < 30  # Returned at the deadline, not after the 60 s compile.
  assert summary["abandoned_compiles"] == 1
  assert "1 compile(s) still running at the budget's end were abandoned" in (tmp_path / "R.md").read_text()


def test_timing_waits_for_the_configuration_compiled_ahead(tmp_path, monkeypatch):
  """No compile runs while a configuration is timed (one compiles ahead; on a GPU its autotuning would
  share the device with the timed steps)."""
  import threading
  import time

  from jaxldm.bench import grads

  compiles, measures, starts, lock = [], [], [], threading.Lock()
  real_compile, real_measure = grads.compile_timed, grads.measure

  def slow_compile(lowered):
    t0 = time.perf_counter()
    with lock:
      n = len(starts)
      starts.append(t0)
    time.sleep(0.3 if n == 0 else 2.0)  # The configuration compiled ahead is still compiling when the first is ready.
    out = real_compile(lowered)
    with lock:
      compiles.append((t0, time.perf_counter()))
    return out

  def noted_measure(*args, **kwargs):
    t0 = time.perf_counter()
    out = real_measure(*args, **kwargs)
    measures.append((t0, time.perf_counter()))
    return out
  monkeypatch.setattr(grads, "compile_timed", slow_compile)
  monkeypatch.setattr(grads, "measure", noted_measure)
  summary = gpu_check.run(tmp_path, size="tiny", models=("autoencoder",), batches=(2,), dtypes=("float32",),
                          convs=("native", "taps"), modes=("nonprivate",), opacus=False, repeats=1, warmup=0,
                          compile_workers=2, results=tmp_path / "R.md")
  assert [r["status"] for r in summary["jaxldm"]] == ["ok", "ok"] and len(compiles) == 2 and len(measures) == 2
  assert all(m1 <= a or b <= m0 for m0, m1 in measures for a, b in compiles)  # No timing overlaps a compile.
  assert [r["compiles_during_timing"] for r in summary["jaxldm"]] == [0, 0]


_SLOW_COMPILE_COMMAND = '''
import sys, threading
from jaxldm import cli
from jaxldm.bench import grads
def never_done(lowered):  # A compile that outlives the budget (and the test's timeout).
  threading.Event().wait(600)
grads.compile_timed = never_done
sys.argv = [cli.__file__] + sys.argv[1:]  # As `python -m jaxldm.cli` (what scripts/gpu_check.sh runs).
sys.exit(cli.main())
'''


def test_the_command_exits_without_joining_an_abandoned_compile(tmp_path):
  """Python joins a thread pool's threads at exit: the command must not wait for a compile the budget
  abandoned (a paper-size compile would hold a lent GPU for minutes). A run that waited for it would
  hit this test's timeout."""
  import os
  import sys

  env = dict(os.environ, JAXLDM_NO_HUGE_PAGES="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SLOW_COMPILE_COMMAND, "bench", "gpu-check", "--tiny",
                         "--out", str(tmp_path / "gc"), "--results", str(tmp_path / "R.md"),
                         "--models", "autoencoder", "--batch", "2", "--dtypes", "float32", "--conv", "native",
                         "--modes", "nonprivate", "--budget-s", "3", "--no-opacus"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "1 compile(s) still running at the budget's end: exiting without waiting" in proc.stdout
  summary = json.loads((tmp_path / "gc" / "cpu_tiny_summary.json").read_text())
  assert summary["abandoned_compiles"] == 1 and summary["jaxldm"][0]["status"] == "skipped"


def test_the_twin_runs_first_within_its_share_and_names_what_it_missed(tmp_path, monkeypatch):
  """The PyTorch/Opacus twin runs before JAX builds anything (JAX's allocator would keep the grid's peak
  memory from the twin's process), bounded by its share of the budget; batches it did not reach are named."""
  import time

  from jaxldm.bench import compare, grads

  events = []
  real_lower = grads.lower

  def twin(model, spec, overrides, *, batches, timeout, keep_going, **kwargs):
    events.append(("twin", model, timeout, keep_going))
    time.sleep(0.2)
    return [{"model": model, "batch": batches[0], "mode": "nonprivate", "step_s": 0.01}]  # Stopped after one.

  def lower(*args, **kwargs):
    events.append(("lower",))
    return real_lower(*args, **kwargs)
  monkeypatch.setattr(gpu_check, "_twin_available", lambda: True)
  monkeypatch.setattr(compare, "run_twin", twin)
  monkeypatch.setattr(grads, "lower", lower)
  t0 = time.perf_counter()
  summary = gpu_check.run(tmp_path, size="tiny", models=("autoencoder",), batches=(2, 4), dtypes=("float32",),
                          convs=("native",), modes=("nonprivate",), budget_s=100.0, repeats=1, warmup=0,
                          results=tmp_path / "R.md")
  assert events[0][:2] == ("twin", "autoencoder") and events[0][3] is True
  assert 100.0 * gpu_check.TWIN_SHARE - (time.perf_counter() - t0) <= events[0][2] <= 100.0 * gpu_check.TWIN_SHARE
  assert [e[0] for e in events[1:]] == ["lower", "lower"]  # The grid (batch 2, batch 4) after the twin.
  assert [r["status"] for r in summary["jaxldm"]] == ["ok", "ok"]
  assert summary["opacus"][0]["status"] == "ok" and summary["opacus"][0]["size"] == "tiny"
  assert "autoencoder: batch 4 not reached in the time budget" in summary["opacus_note"]
  assert "batch 4 not reached" in (tmp_path / "R.md").read_text()

  events.clear()  # Two models: the first may take half the twin's share, the second what is left of it.
  gpu_check._run_twin(gpu_check.SIZES["tiny"], ("unet", "autoencoder"), (2,), 1, 0, "cpu", 40.0, lambda msg: None)
  (_, first, t1, _), (_, second, t2, _) = events
  assert (first, second) == ("unet", "autoencoder")
  assert 19.0 < t1 <= 20.0 and 39.0 < t2 <= 39.8  # (The fake twin took 0.2 s.)


def test_a_configuration_whose_compile_would_outlast_the_budget_is_not_started(tmp_path, monkeypatch):
  """After a model's compiles took ~1000 s, none of its configurations is lowered with 60 s left: each is
  recorded "skipped" with the reason, at once."""
  import time

  from jaxldm.bench import grads

  lowered, real_lower = [], grads.lower

  def lower(target, batch, modes):
    lowered.append(batch)
    return real_lower(target, batch, modes)

  def long_compile(low):  # The compile itself is the tiny model's; the time it reports is a paper model's.
    waited = time.perf_counter()  # No compile time is known before the configuration ahead is lowered
    while len(lowered) < 2 and time.perf_counter() - waited < 10:  # (a cache hit could beat it).
      time.sleep(0.01)
    compiled, _ = real_compile(low)
    return compiled, 1000.0
  real_compile = grads.compile_timed
  monkeypatch.setattr(grads, "lower", lower)
  monkeypatch.setattr(grads, "compile_timed", long_compile)
  t0, said = time.perf_counter(), []
  summary = gpu_check.run(tmp_path, size="tiny", models=("autoencoder",), batches=(2, 3, 4, 5), dtypes=("float32",),
                          convs=("native",), modes=("nonprivate",), opacus=False, budget_s=60.0, repeats=1,
                          warmup=0, results=tmp_path / "R.md", progress=said.append)
  assert time.perf_counter() - t0 < 55
  assert lowered == [2, 3]  # The first two (one compiled ahead) before any compile time was known.
  status = sorted((r["batch"], r["status"]) for r in summary["jaxldm"])  # (Records are in the order measured.)
  assert status == [(2, "ok"), (3, "ok"), (4, "skipped"), (5, "skipped")]
  assert all("~1000 s for this model so far" in r["error"] for r in summary["jaxldm"] if r["status"] == "skipped")
  assert sum("B=4 float32 conv native: not started" in m for m in said) == 1  # Said as it happens.


def test_past_the_deadline_each_mode_is_timed_once():
  """A configuration compiled in time but timed after the budget's end: one warm-up call and one repeat per
  mode (a paper-size step on a CPU takes a minute); before the deadline, every repeat."""
  import time

  from jaxldm.bench import grads

  target = grads.build_target("autoencoder", "autoencoder:tiny", gpu_check.TINY_OVERRIDES["autoencoder"])
  low = grads.lower(target, 2, ("nonprivate", "vmap"))
  compiled, compile_s = {}, {}
  for m in low.lowered:
    compiled[m], compile_s[m] = grads.compile_timed(low.lowered[m])
  calls = {m: 0 for m in compiled}

  def counted(m):
    def call(*args):
      calls[m] += 1
      return compiled[m](*args)
    return call
  late = grads.measure(low, {m: counted(m) for m in compiled}, compile_s, repeats=4, warmup=3,
                       deadline=time.perf_counter())
  assert [len(r["times_s"]) for r in late] == [1, 1] and calls == {"nonprivate": 2, "vmap": 2}
  in_time = grads.measure(low, compiled, compile_s, repeats=4, warmup=1, deadline=time.perf_counter() + 600)
  assert [len(r["times_s"]) for r in in_time] == [4, 4]
