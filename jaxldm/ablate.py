"""`jaxldm ablate`: a grid of DP LDM runs, each trained, evaluated and tabulated; resumable.

  jaxldm ablate --config ablation:tiny --workdir runs/ablation

The grid (ablation) is target epsilon x pretrained-or-scratch x noise multiplicity K x
clip norm C x seeds. Each point is a run directory WORKDIR/runs/<name> (e.g. eps10-pre-K2-C1-s0)
trained by the ordinary LDM trainer and evaluated by `jaxldm evaluate` (report in
<run>/eval/report.json). The report is the "done" mark: a run that has one is not redone, a run
without one resumes through the trainer's own checkpoints, and WORKDIR/ablation.csv (one row per
run), WORKDIR/summary.md (mean and 95% CI over seeds per setting) and WORKDIR/ablation.png (FID,
copy rate and controllability vs epsilon) are rebuilt from the reports on every invocation.

Speed: runs of the same shapes share one jitted step in the process (`ldm.jitted_step`; sigma, the
expected batch size and C are traced arguments, so every epsilon and clip norm uses the same
program), a persistent XLA cache in WORKDIR/.xla_cache
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
from jaxldm.eval import sections

CSV_NAME, PLOT_NAME, SUMMARY_NAME, RUN_RECORD = "ablation.csv", "ablation.png", "summary.md", "ablation_run.json"
GRID_COLUMNS = ("name", "target_epsilon", "pretrained", "noise_multiplicity", "l2_clip_norm", "seed")
TIMING_COLUMNS = ("steps", "train_s", "eval_s", "wall_s", "seeds_per_program")
_REPO = pathlib.Path(__file__).resolve().parents[1]


def columns() -> tuple[str, ...]:
  """ablation.csv's columns: the grid point, every headline of the evaluation's sections, the timing."""
  return GRID_COLUMNS + tuple(h.column_name for h in sections.headline_specs()) + TIMING_COLUMNS


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
  if not run.private:
    overrides.update(parse_override(o) for o in b.get("nonprivate_overrides", ()))
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
  return {"name": run.name, "target_epsilon": run.target_epsilon, "pretrained": run.pretrained,
          "noise_multiplicity": run.noise_multiplicity, "l2_clip_norm": run.l2_clip_norm, "seed": run.seed,
          **sections.study_values(report),  # Every section's headlines, dicts reduced to one number.
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
  names = columns()
  writer.writerow(names)
  for r in rows:
    writer.writerow([_fmt(r.get(c)) for c in names])
  with atomic_open(path) as f:
    f.write(buf.getvalue())


def mean_ci(values, level: float = 0.95) -> tuple[float, float, int]:
  """(mean, half-width of the two-sided Student-t confidence interval, n) of the finite values.

  The interval is over seeds (each seed: its own init, batches, DP noise and samples); with n = 1
  there is no spread to estimate and the half-width is nan. The statistics are
  `jaxldm.eval.utility.seed_summary`'s (unbounded, so the interval is symmetric).
  """
  from jaxldm.eval.utility import seed_summary

  s = seed_summary([math.nan if v is None else v for v in values], level)
  return s["mean"], s["ci"][1] - s["mean"], s["n"]


def summarize(rows: list[dict]) -> list[dict]:
  """One entry per setting (all but the seed): mean and 95% CI over seeds of every headline column.

  Ordered by pretrained-first, then epsilon ascending (inf last), then K and C.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    key = (r["target_epsilon"], r["pretrained"], r["noise_multiplicity"], r["l2_clip_norm"])
    groups.setdefault(key, []).append(r)
  out = []
  for key in sorted(groups, key=lambda k: (not k[1], k[0], k[2], k[3])):
    group = groups[key]
    entry = {"target_epsilon": key[0], "pretrained": key[1], "noise_multiplicity": key[2], "l2_clip_norm": key[3],
             "seeds": len(group)}
    for h in sections.headline_specs():
      metric = h.column_name
      entry[metric], entry[metric + "_ci"], _ = mean_ci([g.get(metric) for g in group])
    if not np.isfinite(key[0]):  # Non-private runs: epsilon is infinite, not missing.
      entry["epsilon"], entry["epsilon_ci"] = float("inf"), float("nan")
    out.append(entry)
  return out


def _pm(mean: float, half: float, spec: str = ".3g", half_spec: str = ".2g") -> str:
  if not np.isfinite(mean):
    return "inf" if mean > 0 else "n/a"  # Non-private runs: epsilon is infinite, not missing.
  return f"{mean:{spec}}" + (f" ± {half:{half_spec}}" if np.isfinite(half) else "")


def _cell(s: dict, h: sections.Headline) -> str:
  """One headline of one setting: mean ± CI half-width (mean alone for a setting's constants, e.g. epsilon)."""
  mean, half = s[h.column_name], s[h.column_name + "_ci"]
  half_spec = ".2g" if h.spec.endswith("g") else h.spec
  return _pm(mean, half if h.spread else float("nan"), h.spec, half_spec)


def summary_markdown(summary: list[dict]) -> str:
  """The per-setting table (mean ± 95% CI over seeds) and the pretrained/scratch FID ratio per epsilon."""
  several = len({(s["noise_multiplicity"], s["l2_clip_norm"]) for s in summary}) > 1
  specs = sections.headline_specs()
  head = ["epsilon (target)", "init"] + (["K", "C"] if several else []) + [h.column_label for h in specs] + ["seeds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    cells = [f"{s['target_epsilon']:g}", "pretrained" if s["pretrained"] else "scratch"]
    cells += [str(s["noise_multiplicity"]), f"{s['l2_clip_norm']:g}"] if several else []
    cells += [_cell(s, h) for h in specs] + [str(s["seeds"])]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Mean ± half-width of the 95% Student-t confidence interval over seeds.")
  lines.append("")
  owner = [h.column_label for s in sections.registered() for h in s.HEADLINES if s.part == sections.OWNER]
  released = [h.column_label for s in sections.registered() for h in s.HEADLINES if s.part != sections.OWNER]
  lines.append(f"**For the data owner only — do not release:** the columns {', '.join(owner)} are computed from the "
               "private training data (or a non-DP model of real data) outside DP (docs/privacy.md); "
               f"{', '.join(released)} (the DP guarantee, and against the held-out set) are the releasable columns.")
  ratios = []
  for s in summary:
    if not s["pretrained"]:
      continue
    twin = [t for t in summary if not t["pretrained"] and t["target_epsilon"] == s["target_epsilon"]
            and t["noise_multiplicity"] == s["noise_multiplicity"] and t["l2_clip_norm"] == s["l2_clip_norm"]]
    if twin and np.isfinite(s["fid"]) and twin[0]["fid"] > 0:
      ratios.append(f"epsilon {s['target_epsilon']:g}: {s['fid'] / twin[0]['fid']:.3g}")
  if ratios:
    lines.append(f"FID pretrained / scratch (means): {'; '.join(ratios)}.")
  return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: pathlib.Path) -> None:
  """The plotted headlines (`Headline.plot`: FID, copy rates, controllability) vs achieved epsilon
  (`summarize`'s entries), one line per setting other than epsilon; mean over seeds with 95% CI bars.
  Non-private runs (epsilon inf) sit at the right edge, labelled inf; settings without an achieved
  epsilon are left out.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  summary = [s for s in summary if not np.isnan(s["epsilon"])]
  finite = [s["epsilon"] for s in summary if np.isfinite(s["epsilon"])]
  inf_x = (max(finite) * 2 if finite else 1.0)
  lines: dict[str, list[dict]] = {}
  for s in summary:
    label = f"{'pretrained' if s['pretrained'] else 'scratch'}, K={s['noise_multiplicity']}, C={s['l2_clip_norm']:g}"
    lines.setdefault(label, []).append(s)
  metrics = [(h.column_name, h.column_label) for h in sections.headline_specs() if h.plot]
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), dpi=110, squeeze=False)
  axes = axes[0]
  for ax, (metric, title) in zip(axes, metrics):
    for label, points in sorted(lines.items()):
      points = sorted(points, key=lambda s: s["target_epsilon"])
      xs = [s["epsilon"] if np.isfinite(s["epsilon"]) else inf_x for s in points]
      ys = [s[metric] for s in points]
      err = [s[metric + "_ci"] if np.isfinite(s[metric + "_ci"]) else 0.0 for s in points]
      ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ticks = sorted({round(e, 2) for e in finite})
    labels = [f"{t:g}" for t in ticks]
    if any(not np.isfinite(s["epsilon"]) for s in summary):
      ax.axvline(inf_x, color="0.8", lw=0.8, ls=":")
      ticks, labels = ticks + [inf_x], labels + ["inf\n(non-private)"]
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("epsilon (achieved)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
  if lines:
    axes[0].legend(fontsize=7)
  fig.suptitle("privacy-utility vs epsilon (mean over seeds, 95% CI)", fontsize=10)
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
  needed = [("eval.real", config.eval.real, "held-out real volumes"),
            ("base.autoencoder_workdir", config.base.autoencoder_workdir, "a trained autoencoder"),
            ("base.data_root", config.base.data_root, "the private training volumes")]
  if any(run.pretrained for run in runs):
    needed.append(("base.pretrained_workdir", config.base.pretrained_workdir, "the public-pretrained LDM"))
  for key, path, what in needed:
    if not pathlib.Path(path).is_dir():
      raise ConfigError(f"config key '{key}': {path} is not a directory ({what}); create it first or point the "
                        f"key at it (the study's tiny variant expects `make demo`'s runs/demo, see its docstring)")
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
        from jaxldm.infer.checkpoints import write_json
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
  summary = summarize(rows)
  plot(summary, workdir / PLOT_NAME)
  table = summary_markdown(summary)
  with atomic_open(workdir / SUMMARY_NAME) as f:
    f.write(table)
  console.print(table)
  console.print(f"wrote {workdir / CSV_NAME} ({len(rows)} rows), {workdir / SUMMARY_NAME} and {workdir / PLOT_NAME}")
  return {"rows": rows, "trained": trained, "evaluated": evaluated, "csv": workdir / CSV_NAME,
          "png": workdir / PLOT_NAME, "summary": workdir / SUMMARY_NAME}
