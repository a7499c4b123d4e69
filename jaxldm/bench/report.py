"""Benchmark records: JSON files, terminal tables, the throughput plot and cross-file comparison.

A record is one (mode, batch) measurement (see `jaxldm.bench.grads`); a file is a JSON list of them.
`scripts/bench_opacus.py` writes the same records for PyTorch/Opacus, so `compare` can put a jaxldm
file and an Opacus file side by side.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError

REQUIRED = ("mode", "model", "batch", "params", "step_s", "examples_per_s", "peak_bytes", "compile_s",
            "backend", "device_kind")


def save(path: str | pathlib.Path, records: Sequence[dict]) -> None:
  with atomic_open(path, "w") as f:
    json.dump(list(records), f, indent=1)
    f.write("\n")


def save_json(path: str | pathlib.Path, obj) -> None:
  """Any JSON-able result (compare, trainer, gpu-check summaries), written atomically."""
  with atomic_open(path, "w") as f:
    json.dump(obj, f, indent=1, default=str)
    f.write("\n")


def load(path: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such benchmark file (write one with `jaxldm bench grads --json`)")
  try:
    records = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
    raise ConfigError(f"{path}: expected a JSON list of benchmark records")
  for i, r in enumerate(records):
    missing = [k for k in REQUIRED if k not in r]
    if missing:
      raise ConfigError(f"{path}: record {i} lacks {', '.join(missing)}")
  return records


def _mib(n) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f}"


def table(records: Sequence[dict], title: str = ""):
  from rich.table import Table

  t = Table(title=title or None)
  for col in ("model", "batch", "mode", "step ms", "ex/s", "x nonprivate", "compile s", "program MiB",
              "peak MiB"):
    t.add_column(col, justify="left" if col in ("model", "mode") else "right")
  for r in records:
    ratio = r.get("ratio_to_nonprivate")
    t.add_row(r["model"], str(r["batch"]), r["mode"], f"{r['step_s'] * 1e3:,.1f}",
              f"{r['examples_per_s']:,.1f}", "-" if ratio is None else f"{ratio:.3f}",
              f"{r['compile_s']:.1f}", _mib(r.get("program_bytes")), _mib(r.get("peak_bytes")))
  return t


def plot(records: Sequence[dict], path: str | pathlib.Path) -> None:
  """Throughput against batch size (one line per mode) and the cost relative to non-private."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = sorted({r["model"] for r in records})
  fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
  for row, model in zip(axes, models):
    rs = [r for r in records if r["model"] == model]
    for mode in dict.fromkeys(r["mode"] for r in rs):
      pts = sorted((r["batch"], r["examples_per_s"], r.get("ratio_to_nonprivate")) for r in rs
                   if r["mode"] == mode)
      b = [p[0] for p in pts]
      row[0].plot(b, [p[1] for p in pts], marker="o", label=mode)
      if all(p[2] is not None for p in pts):
        row[1].plot(b, [p[2] for p in pts], marker="o", label=mode)
    row[0].set(title=f"{model}: throughput", xlabel="batch", ylabel="examples / s", xscale="log")
    row[1].axhline(1.15, color="grey", ls=":", lw=1, label="1.15x goal")
    row[1].set(title=f"{model}: step time / non-private", xlabel="batch", ylabel="ratio", xscale="log")
    for ax in row:
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  first = records[0]
  fig.suptitle(f"per-example gradients on {first['device_kind']} ({first['backend']})", fontsize=10)
  fig.tight_layout()
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def compare(a: Sequence[dict], b: Sequence[dict]) -> list[dict]:
  """Step-time ratios B / A for every pair of modes measured on the same (model, batch)."""
  rows = []
  for rb in b:
    for ra in a:
      if (ra["model"], ra["batch"]) == (rb["model"], rb["batch"]):
        rows.append({"model": rb["model"], "batch": rb["batch"], "a_mode": ra["mode"],
                     "b_mode": rb["mode"], "a_step_s": ra["step_s"], "b_step_s": rb["step_s"],
                     "ratio": rb["step_s"] / ra["step_s"], "a_params": ra["params"],
                     "b_params": rb["params"]})
  return rows


def compare_table(rows: Sequence[dict], name_a: str, name_b: str):
  from rich.table import Table

  params = sorted({(r["b_params"], r["a_params"]) for r in rows})
  caption = "parameters " + "; ".join(f"{name_b} {b:,} / {name_a} {a:,}" for b, a in params)
  t = Table(title=f"step time ratio B / A (B = {name_b}, A = {name_a}; same model and batch)", caption=caption)
  for col in ("model", "batch", "B mode", "A mode", "B ms", "A ms", "B / A"):
    t.add_column(col, justify="left" if "mode" in col or col == "model" else "right")
  for r in rows:
    t.add_row(r["model"], str(r["batch"]), r["b_mode"], r["a_mode"], f"{r['b_step_s'] * 1e3:,.1f}",
              f"{r['a_step_s'] * 1e3:,.1f}", f"{r['ratio']:.2f}")
  return t


def console():
  """A rich console at least 120 columns wide, so tables do not fold when output is piped."""
  from rich.console import Console

  c = Console()
  return c if c.is_terminal else Console(width=max(c.width, 120))
