"""`jaxldm ablate`: a grid of DP LDM runs, each trained, evaluated and tabulated; resumable.

  jaxldm ablate --config configs/ablation.py:tiny --workdir runs/ablation

The grid (configs/ablation.py) is target epsilon x pretrained-or-scratch x noise multiplicity K x
clip norm C x seeds. Each point is a run directory WORKDIR/runs/<name> (e.g. eps10-pre-K2-C1-s0)
trained by the ordinary LDM trainer and evaluated by `jaxldm evaluate` (report in
<run>/eval/report.json). The report is the "done" mark: a run that has one is not redone, a run
without one resumes through the trainer's own checkpoints, and WORKDIR/ablation.csv and
WORKDIR/ablation.png are rebuilt from the reports on every invocation.

Speed: runs of the same shapes share one jitted step in the process (`ldm.jitted_step`; sigma is a
traced argument, so every epsilon uses the same program), a persistent XLA cache in WORKDIR/.xla_cache
shares compiled programs across processes, and with `vmap_seeds` the seeds of one setting train
together in one vmapped program (`jaxldm.train.ldm_seeds`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError, load_config, parse_override

CSV_NAME, PLOT_NAME, RUN_RECORD = "ablation.csv", "ablation.png", "ablation_run.json"
COLUMNS = ("name", "target_epsilon", "pretrained", "noise_multiplicity", "l2_clip_norm", "seed", "epsilon", "fid",
           "kid", "copy_rate", "controllability_r", "steps", "train_s", "eval_s", "wall_s", "seeds_per_program")
_REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Run:
  """One grid point."""
  target_epsilon: float
  pretrained: bool
  noise_multiplicity: int
  l2_clip_norm: float
  seed: int

  @property
  def private(self) -> bool:
    return math.isfinite(self.target_epsilon)

  @property
  def setting(self) -> str:
    """Everything but the seed: runs with the same setting can train in one vmapped program."""
    return (f"eps{self.target_epsilon:g}-{'pre' if self.pretrained else 'scratch'}-K{self.noise_multiplicity}"
            f"-C{self.l2_clip_norm:g}")

  @property
  def name(self) -> str:
    return f"{self.setting}-s{self.seed}"

  @property
  def noise_seed(self) -> int:
    """Fixed per seed (research runs): DP noise seed 2 s, sampling seed 2 s + 1 (see dp.setup)."""
    return 2 * self.seed


def expand(config: ml_collections.ConfigDict) -> list[Run]:
  """The grid's runs, seeds innermost (a setting's seeds are adjacent)."""
  g = config.grid
  try:
    axes = ([float(e) for e in g.target_epsilon], [_bool(p) for p in g.pretrained],
            [int(k) for k in g.noise_multiplicity], [float(c) for c in g.l2_clip_norm], [int(s) for s in g.seeds])
  except ValueError as e:
    raise ConfigError(f"config group 'grid': {e}") from e
  for key, values in zip(("target_epsilon", "pretrained", "noise_multiplicity", "l2_clip_norm", "seeds"), axes):
    if not values:
      raise ConfigError(f"config key 'grid.{key}' is empty; give at least one value")
  if any(e <= 0 for e in axes[0]):
    raise ConfigError(f"config key 'grid.target_epsilon': {axes[0]}; epsilons must be > 0 (inf = non-private)")
  runs = [Run(*point) for point in itertools.product(*axes)]
  return list(dict.fromkeys(runs))  # Duplicates (repeated values) once.


def _bool(v: Any) -> bool:
  if isinstance(v, str):
    if v.strip().lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"pretrained must be true or false, got {v!r}")
    return v.strip().lower() in ("true", "1")
  return bool(v)


def _config_path(spec: str) -> str:
  """A trainer config spec relative to the working directory, else to the jaxldm checkout."""
  path, _, variant = spec.partition(":")
  if not pathlib.Path(path).is_file() and (_REPO / path).is_file():
    path = str(_REPO / path)
  return f"{path}:{variant}" if variant else path


def run_config(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The trainer config of one run: the base config, base.overrides, then the grid point."""
  b = config.base
  overrides: dict[str, Any] = dict(parse_override(o) for o in b.overrides)
  if run.pretrained and not b.pretrained_workdir:
    raise ConfigError("config key 'base.pretrained_workdir' is empty but grid.pretrained contains true")
  stats = "pretrained" if run.pretrained else b.scratch_stats_from
  if not stats:
    raise ConfigError("config key 'base.scratch_stats_from': from-scratch runs need a public attribute CSV for "
                      "the attribute mean/std (a DP run must not compute them from the private data)")
  overrides.update({"autoencoder_workdir": b.autoencoder_workdir, "data.root": b.data_root,
                    "pretrained_workdir": b.pretrained_workdir if run.pretrained else "",
                    "conditioning.stats_from": stats, "diffusion.noise_multiplicity": run.noise_multiplicity,
                    "seed": run.seed})
  if run.private:
    overrides.update({"dp.target_epsilon": run.target_epsilon, "dp.noise_multiplier": 0.0,
                      "dp.l2_clip_norm": run.l2_clip_norm, "dp.noise_seed": run.noise_seed})
  return load_config(_config_path(b.ldm_dp if run.private else b.ldm), overrides)


# ---------------------------------------------------------------------------------------------
# Rows, CSV and plot (always rebuilt from the runs' reports)
# ---------------------------------------------------------------------------------------------
def report_path(workdir: pathlib.Path, run: Run) -> pathlib.Path:
  return workdir / "runs" / run.name / "eval" / "report.json"


def row(workdir: pathlib.Path, run: Run) -> dict | None:
  path = report_path(workdir, run)
  if not path.is_file():
    return None
  report = json.loads(path.read_text())
  run_dir = workdir / "runs" / run.name
  timing = json.loads((run_dir / RUN_RECORD).read_text()) if (run_dir / RUN_RECORD).is_file() else {}
  trained = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
  rs = [v for v in (report.get("controllability") or {}).values() if v is not None and np.isfinite(v)]
  return {"name": run.name, "target_epsilon": run.target_epsilon, "pretrained": run.pretrained,
          "noise_multiplicity": run.noise_multiplicity, "l2_clip_norm": run.l2_clip_norm, "seed": run.seed,
          "epsilon": report.get("epsilon"), "fid": report.get("fid"), "kid": report.get("kid"),
          "copy_rate": report.get("copy_rate"), "controllability_r": float(np.mean(rs)) if rs else None,
          "steps": trained.get("steps"), "train_s": timing.get("train_s"), "eval_s": timing.get("eval_s"),
          "wall_s": timing.get("wall_s"), "seeds_per_program": timing.get("seeds_per_program")}


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(COLUMNS)
  for r in rows:
    writer.writerow([_fmt(r[c]) for c in COLUMNS])
  with atomic_open(path) as f:
    f.write(buf.getvalue())


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """FID vs achieved epsilon, one line per setting other than epsilon; mean over seeds, min/max bars.

  Non-private runs (epsilon inf) sit at the right edge, labelled inf.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  finite = [r["epsilon"] for r in rows if r["epsilon"] is not None and np.isfinite(r["epsilon"])]
  inf_x = (max(finite) * 2 if finite else 1.0)
  lines: dict[str, dict[float, list]] = {}
  for r in rows:
    if r["fid"] is None or r["epsilon"] is None:
      continue
    label = f"{'pretrained' if r['pretrained'] else 'scratch'}, K={r['noise_multiplicity']}, C={r['l2_clip_norm']:g}"
    lines.setdefault(label, {}).setdefault(r["target_epsilon"], []).append(r)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for label, points in sorted(lines.items()):
    xs, ys, lo, hi = [], [], [], []
    for target in sorted(points):
      group = points[target]
      eps = float(np.mean([r["epsilon"] for r in group]))
      fids = np.array([r["fid"] for r in group], float)
      xs.append(eps if np.isfinite(eps) else inf_x)
      ys.append(fids.mean())
      lo.append(fids.mean() - fids.min())
      hi.append(fids.max() - fids.mean())
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
  ax.set_xscale("log")
  if any(not np.isfinite(r["epsilon"]) for r in rows if r["epsilon"] is not None):
    ax.axvline(inf_x, color="0.8", lw=0.8, ls=":")
    ax.text(inf_x, ax.get_ylim()[1], " inf (non-private)", va="top", fontsize=7, color="0.4")
  ax.set_xlabel("epsilon (achieved)")
  ax.set_ylabel("FID (lower is better)")
  ax.set_title("privacy-utility: FID vs epsilon (mean over seeds, min/max)")
  ax.grid(alpha=0.3, which="both")
  if lines:
    ax.legend(fontsize=7)
  fig.tight_layout()
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def set_compilation_cache(workdir: pathlib.Path) -> str:
  """Persistent XLA cache in WORKDIR/.xla_cache, unless one is configured already (JAX_COMPILATION_CACHE_DIR)."""
  import jax

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(workdir / ".xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  return jax.config.jax_compilation_cache_dir


def _evaluate(config, run_dir: pathlib.Path):
  from jaxldm.eval import evaluate

  e = config.eval
  opts = evaluate.Options(n=e.n, features=e.features, feature_weights=e.feature_weights or None, steps=e.steps,
                          guidance=e.guidance, batch_size=e.batch_size, seed=e.seed, training_images=False)
  return evaluate.evaluate(run_dir, e.real, run_dir / "eval", opts)


def ablate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, console=None) -> dict:
  """Trains and evaluates every unfinished run of the grid, then rebuilds the CSV and the plot.

  Returns:
    {"rows": CSV rows, "trained": runs trained now, "evaluated": runs evaluated now,
     "csv": path, "png": path}.
  """
  from rich.console import Console

  from jaxldm.train import ldm, ldm_seeds

  console = console or Console(stderr=True)
  workdir = pathlib.Path(workdir)
  runs = expand(config)
  if not pathlib.Path(config.eval.real).is_dir():
    raise ConfigError(f"config key 'eval.real': {config.eval.real} is not a directory of held-out volumes")
  configs = {run: run_config(config, run) for run in runs}  # Every config error before any training.
  workdir.mkdir(parents=True, exist_ok=True)
  cache = set_compilation_cache(workdir)
  pending = [run for run in runs if not report_path(workdir, run).is_file()]
  console.print(f"ablation: {len(runs)} runs, {len(runs) - len(pending)} done, {len(pending)} to do "
                f"(XLA cache {cache})")

  groups: dict[str, list[Run]] = {}
  for run in pending:
    groups.setdefault(run.setting, []).append(run)
  trained = evaluated = 0
  durations: list[float] = []
  done_before = len(runs) - len(pending)
  for setting, members in groups.items():
    vmapped = bool(config.vmap_seeds) and len(members) > 1 and members[0].private
    batches = [members] if vmapped else [[m] for m in members]
    for batch in batches:
      t0 = time.perf_counter()
      dirs = [workdir / "runs" / r.name for r in batch]
      if vmapped:
        ldm_seeds.train_seeds([configs[r] for r in batch], dirs)
      else:
        ldm.train_and_evaluate(configs[batch[0]], dirs[0])
      trained += len(batch)
      train_s = (time.perf_counter() - t0) / len(batch)
      for run, run_dir in zip(batch, dirs):
        t1 = time.perf_counter()
        report = _evaluate(config, run_dir)
        evaluated += 1
        eval_s = time.perf_counter() - t1
        from jaxldm.train.common import write_json
        write_json(run_dir / RUN_RECORD, {"name": run.name, **dataclasses.asdict(run), "train_s": train_s,
                                          "eval_s": eval_s, "wall_s": train_s + eval_s,
                                          "seeds_per_program": len(batch)})
        durations.append(train_s + eval_s)
        i = done_before + trained - len(batch) + batch.index(run) + 1
        left = len(runs) - done_before - len(durations)
        eta = float(np.mean(durations)) * left
        console.print(f"[bold][{i}/{len(runs)}][/] {run.name}: epsilon {report['epsilon']:.3g}, FID "
                      f"{report['fid']:.4g}, train {train_s:.1f}s + eval {eval_s:.1f}s"
                      + (f" ({len(batch)} seeds in one program)" if len(batch) > 1 else "")
                      + f", ETA {eta:.0f}s")

  rows = [r for r in (row(workdir, run) for run in runs) if r is not None]
  write_csv(rows, workdir / CSV_NAME)
  plot(rows, workdir / PLOT_NAME)
  console.print(f"wrote {workdir / CSV_NAME} ({len(rows)} rows) and {workdir / PLOT_NAME}")
  return {"rows": rows, "trained": trained, "evaluated": evaluated, "csv": workdir / CSV_NAME,
          "png": workdir / PLOT_NAME}
