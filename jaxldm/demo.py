"""The main job end to end: `jaxldm demo` (what `make demo` runs).

  shipped public models (autoencoder, SSL encoder, LDM; trained on public phantoms only,
  jaxldm/pretrained.py) -> DP finetuning (private, epsilon 10) -> sampling + evaluation
  -> OUT/report.md, report.json, conditioning_sweep.png, OUT/public_only/ (the public model alone)

`--from-scratch` (and sizes without shipped models) trains the public stages first instead:
  phantoms -> autoencoder (public) -> SSL encoder (public) -> LDM pretraining (public) -> ...

Each stage writes into OUT/<stage>/ and is skipped when its final record exists; an interrupted
stage resumes from its checkpoints (the trainers do that), so re-running the demo continues where it
stopped. The DP stage draws its noise seed from OS entropy (a real private run) and keeps it in
OUT/ldm_dp/dp_secrets.json (0600) so a resumed run continues the same noise stream.
`--size tiny` fits a 2-core CPU; `--size paper` is the paper's geometry for an accelerator.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

from jaxldm.config import ConfigError, load_config
from jaxldm.eval import sections

@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes of one demo: how many phantoms and how long each stage trains."""
  n_public: int
  n_private: int
  n_heldout: int
  n_samples: int
  autoencoder_steps: int
  ssl_steps: int
  ldm_steps: int
  dp_steps: int
  target_epsilon: float = 10.0
  delta: float = 1e-5
  sample_steps: int = 50  # DDIM steps for the evaluation samples and the sweep.
  guidance: float = 2.0  # Classifier-free guidance scale of the evaluation samples and the sweep.
  dp_overrides: dict = dataclasses.field(default_factory=dict)  # Extra ldm_dp config (under the caller's).
  compare_public: bool = False  # Also evaluate the public LDM alone (OUT/public_only/).
  sweep: bool = False  # Conditioning sweep figure (OUT/conditioning_sweep.png).


PLANS = {
    # Measured on a 2-core CPU: see README "What `make demo` does". With the shipped public models
    # (jaxldm/pretrained.py) the public stages are installed, not trained: *_steps of the public
    # stages only apply to --from-scratch.
    # Held-out = private size: the memorization threshold compares each training volume with its
    # nearest held-out one, and fewer candidates would bias it low (scripts/memorization_check.py).
    # DP finetuning: 256 private volumes and an expected batch of 32 (q 1/8: sigma 1.386 at epsilon 10
    # over 300 steps), one noise draw per example (K = 1: the DP step's cost is the real Poisson batch
    # cut to microbatches of 8: 36.7 rows per step on average vs 40.0 with 16, same cost per row) and
    # a quarter of the pretraining learning rate (the noisy Adam steps should not walk far from the
    # public model; with the 6,000-step shipped LDM, 5e-4 -> 2.5e-4 gave, one draw each, LV r 0.83 ->
    # 0.85, MAE 18.0 -> 16.6 ml, unmeasurable 4 -> 2 of 64: benchmarks/NOTES.md, session 9).
    # Expected batch 16 (sigma 0.907) gave LV-volume r 0.84 / 0.87 and MAE 23.4 / 20.6 ml on two
    # noise draws, 32 gave 0.88 / 0.89 and 20.1 / 18.3 ml (guidance 2, learning rate 5e-4).
    # Samples: guidance 1.5 and 25 DDIM steps. On one batch-32 DP model, guidance 2 -> 1.5 took the
    # unmeasurable samples from 6 to 3 of 64 and the LV MAE from 18.3 to 16.2 ml (r 0.89 -> 0.86);
    # on a batch-16 one, 5 -> 2 of 64. 50 -> 25 DDIM steps on one DP model (draw 6): LV r 0.83 -> 0.82,
    # MAE 17.4 -> 17.7 ml, RV r 0.87 -> 0.92, ES/ED 0.92 both, evaluation 103 -> 67 s (README "What
    # `make demo` does").
    "tiny": Plan(n_public=64, n_private=256, n_heldout=256, n_samples=64, autoencoder_steps=250,
                 ssl_steps=100, ldm_steps=350, dp_steps=300, sample_steps=25, guidance=1.5, compare_public=True,
                 sweep=True, dp_overrides={"dp.expected_batch_size": 32, "dp.microbatch_size": 8,
                                           "diffusion.noise_multiplicity": 1, "optim.learning_rate": 2.5e-4}),
    "default": Plan(n_public=256, n_private=256, n_heldout=256, n_samples=64, autoencoder_steps=5000,
                    ssl_steps=2000, ldm_steps=10000, dp_steps=2000, compare_public=True, sweep=True),
    "paper": Plan(n_public=1000, n_private=1000, n_heldout=1000, n_samples=200, autoencoder_steps=20000,
                  ssl_steps=5000, ldm_steps=50000, dp_steps=5000, compare_public=True, sweep=True),
}
MODE_FILE = "demo.json"


def _config(name: str, size: str, overrides: dict, extra: dict):
  """The packaged preset NAME:size with the demo's overrides (works after a plain pip install)."""
  return load_config(f"{name}:{size}", {**overrides, **extra.get(name, {})})


def run(out: str | pathlib.Path = "runs/demo", size: str = "tiny", *, plan: Plan | None = None,
        overrides: dict[str, dict] | None = None, say: Callable[[str], None] = print,
        from_scratch: bool = False) -> dict:
  """Runs (or resumes) every stage; returns the evaluation report.

  plan: replaces PLANS[size] (tests use a miniature one); overrides: extra config overrides per
  stage name ("autoencoder", "ssl", "ldm", "ldm_dp"), e.g. narrower models. from_scratch: train the
  public stages here instead of installing the shipped public models (the only way for sizes
  without shipped models).
  """
  from jaxldm import pretrained
  from jaxldm.data import phantoms
  from jaxldm.data.defaults import SIZES
  from jaxldm.eval import evaluate
  from jaxldm.infer.ssl import ENCODER_FILE
  from jaxldm.train import autoencoder, ldm, ssl

  if size not in PLANS:
    raise ConfigError(f"--size {size!r}: choose one of {', '.join(PLANS)}")
  plan, out = plan or PLANS[size], pathlib.Path(out)
  shipped = not from_scratch and pretrained.available(size)
  extra = overrides or {}
  shape, spacing = SIZES[size]
  data = {"data.shape": shape, "data.spacing": spacing}
  public, private, heldout = out / "phantoms/public", out / "phantoms/private", out / "phantoms/heldout"
  ae_dir, ssl_dir, ldm_dir, dp_dir = out / "autoencoder", out / "ssl", out / "ldm", out / "ldm_dp"
  stages = 6
  started = time.perf_counter()
  timings: dict[str, float] = {}
  mode = {"public_models": "shipped" if shipped else "trained here", "size": size}
  mode_path = out / MODE_FILE
  if mode_path.is_file():
    before = json.loads(mode_path.read_text())
    if before.get("public_models") != mode["public_models"]:
      raise ConfigError(f"{out} holds a demo whose public models were {before.get('public_models')}; "
                        f"this one's would be {mode['public_models']}: choose another --out")
  out.mkdir(parents=True, exist_ok=True)

  def banner(i: int, text: str, done: bool = False) -> None:
    clock = f"{(time.perf_counter() - started) / 60:.1f} min"
    say(f"[{i}/{stages}] {text}" + (" - done already, skipping" if done else "") + f"  ({clock})")

  def lap(name: str, since: float) -> None:
    timings[name] = round(time.perf_counter() - since, 1)

  # 1. Data: public domain (pretraining), private domain (DP finetuning), held-out private (evaluation).
  #    With the shipped models the public set is theirs (same seed and size: the same volumes), kept
  #    for the public model's own evaluation (its training set for the memorization check).
  t = time.perf_counter()
  if shipped:
    recipe = pretrained.RECIPES[size]
    n_public, public_seed = recipe.n_public, recipe.phantom_seed
  else:
    n_public, public_seed = plan.n_public, 0
  todo = [(public, n_public, "public", public_seed), (private, plan.n_private, "private", 1),
          (heldout, plan.n_heldout, "private", 2)]
  missing = [t for t in todo if not (t[0] / "attributes.csv").is_file()]
  banner(1, f"phantoms: {n_public} public, {plan.n_private} private, {plan.n_heldout} held-out "
            f"{'x'.join(map(str, shape))} volumes", done=not missing)
  for target, n, domain, seed in missing:
    phantoms.write_dataset(target, n, domain=domain, shape=shape, spacing=spacing, seed=seed, progress=True)
  lap("phantoms", t)

  t = time.perf_counter()
  if shipped:
    # 2-4. The shipped public models (sha256-checked) as ordinary workdirs.
    done = all((d / f).is_file() for d, f in ((ae_dir, "autoencoder.json"), (ssl_dir, ENCODER_FILE),
                                               (ldm_dir, "run.json")))
    record = pretrained.verify(size)
    steps = ", ".join(f"{s} {e['step']} steps" for s, e in record["stages"].items())
    banner(2, f"shipped public models ({steps}; trained on {record['data']['n']} public phantoms)", done)
    if not done:
      pretrained.install(out, size, public_root=public)
    banner(3, "contrastive 3D encoder: shipped", True)
    banner(4, "latent diffusion pretraining: shipped", True)
  else:
    # 2. Autoencoder on public data (frozen afterwards).
    done = (ae_dir / "autoencoder.json").is_file()
    banner(2, f"autoencoder on public phantoms ({plan.autoencoder_steps} steps)", done)
    if not done:
      autoencoder.train_and_evaluate(_config("autoencoder", size, {
          **data, "data.root": str(public), "train.steps": plan.autoencoder_steps}, extra), ae_dir)

    # 3. Self-supervised encoder on public data: the default feature extractor (FID, memorization).
    done = (ssl_dir / ENCODER_FILE).is_file()
    banner(3, f"contrastive 3D encoder on public phantoms ({plan.ssl_steps} steps)", done)
    if not done:
      ssl.train_and_evaluate(_config("ssl", size, {
          **data, "data.root": str(public), "train.steps": plan.ssl_steps}, extra), ssl_dir)

    # 4. LDM pretraining on public data.
    done = (ldm_dir / "run.json").is_file()
    banner(4, f"latent diffusion pretraining on public phantoms ({plan.ldm_steps} steps)", done)
    if not done:
      ldm.train_and_evaluate(_config("ldm", size, {
          **data, "data.root": str(public), "autoencoder_workdir": str(ae_dir), "train.steps": plan.ldm_steps},
          extra), ldm_dir)
  lap("public_models", t)
  mode_path.write_text(json.dumps(mode, indent=2) + "\n")

  # 5. DP finetuning on private data.
  t = time.perf_counter()
  done = (dp_dir / "run.json").is_file()
  banner(5, f"DP finetuning on private phantoms (epsilon {plan.target_epsilon:g}, delta {plan.delta:g}, "
            f"{plan.dp_steps} steps)", done)
  if not done:
    ldm.train_and_evaluate(_config("ldm_dp", size, {
        **data, "data.root": str(private), "autoencoder_workdir": str(ae_dir), "pretrained_workdir": str(ldm_dir),
        "train.steps": plan.dp_steps, "dp.target_epsilon": plan.target_epsilon, "dp.delta": plan.delta,
        "sampling.guidance_scale": plan.guidance,  # What `jaxldm sample --workdir` on this run uses.
        **plan.dp_overrides}, extra), dp_dir)
  lap("dp_finetuning", t)

  # 6. Sample with the held-out attributes and evaluate against held-out private volumes.
  t = time.perf_counter()
  banner(6, f"sampling {plan.n_samples} volumes and evaluating (FID/KID, memorization, safeguard, "
            "controllability, privacy)")
  report = evaluate.evaluate(dp_dir, heldout, out, evaluate.Options(
      n=plan.n_samples, feature_weights=str(ssl_dir), steps=plan.sample_steps, guidance=plan.guidance))
  lap("evaluation", t)
  summary = {**mode, "plan": dataclasses.asdict(plan), "dp": _headline(report)}
  if plan.compare_public:
    t = time.perf_counter()
    say("  the public model alone (no finetuning) against the same held-out set -> public_only/")
    public_report = evaluate.evaluate(ldm_dir, heldout, out / "public_only", evaluate.Options(
        n=plan.n_samples, feature_weights=str(ssl_dir), steps=plan.sample_steps, guidance=plan.guidance,
        training_images=False))
    summary["public_only"] = _headline(public_report)
    lap("public_only_evaluation", t)
  t = time.perf_counter()
  figures = conditioned_figure(out, heldout, columns=8)
  if plan.sweep:
    say("  conditioning sweep (LV volume at ED and ES) -> conditioning_sweep.png")
    figures.append(conditioning_sweep(dp_dir, heldout, out, spacing, steps=plan.sample_steps,
                                      guidance=plan.guidance))
  lap("figures", t)
  timings["total"] = round(time.perf_counter() - started, 1)
  summary.update(figures=figures, seconds=timings)
  mode_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
  say(f"finished in {(time.perf_counter() - started) / 60:.1f} min")
  return report


def _headline(report: dict) -> dict:
  """The demo's numbers of one evaluation: every section's digest (epsilon, FID/KID, copy rates, the
  phantom controllability per attribute with its MAE and failed measurements, ES/ED accuracy, ...)."""
  return sections.digest(report)


def _sample_titles(values, mask, columns) -> list[str]:
  """'LV 152 ml ED' per row: the conditioned LV volume of its phase (or '' without one)."""
  import numpy as np

  col = {c: j for j, c in enumerate(columns)}
  titles = []
  for v, m in zip(values, mask):
    if not all(k in col and m[col[k]] > 0 for k in ("phase", "lv_edv_ml", "lv_esv_ml")):
      titles.append("")
      continue
    es = v[col["phase"]] >= 0.5
    lv = v[col["lv_esv_ml" if es else "lv_edv_ml"]]
    titles.append(f"LV {lv:.0f} ml {'ES' if es else 'ED'}")
  return titles if any(titles) else [""] * len(values)


def conditioned_figure(out: pathlib.Path, heldout: pathlib.Path, *, columns: int = 8) -> list[str]:
  """OUT/real_vs_synthetic_conditioned.png: held-out volumes (top) and samples (bottom), each titled
  with its LV volume and phase (the samples: the conditioning they were drawn with)."""
  import numpy as np

  from jaxldm.eval import controllability as ctl
  from jaxldm.eval import evaluate
  from jaxldm.infer import generate
  from jaxldm.infer.pictures import save_mid_slices

  info = json.loads((out / "ldm_dp" / "ldm.json").read_text())
  names = list(info["attributes"])
  if not names or not (out / "samples").is_dir():
    return []
  syn_v, syn_vals, syn_mask = evaluate.read_samples(out / "samples", names)
  data_cfg = generate.run_data_config(out / "ldm_dp")
  real_v, real_vals, real_mask, _ = evaluate.load_real(data_cfg, heldout, "held-out")
  k = min(columns, len(real_v), len(syn_v))
  measured = ctl.measure_volumes(syn_v[:k], tuple(data_cfg.spacing))["lv_volume_ml"]
  real_t = [f"real: {t}" for t in _sample_titles(real_vals[:k], real_mask[:k], names)]
  syn_t = [f"cond {t}\nmeasured {m:.0f} ml" if np.isfinite(m) else f"cond {t}\nmeasured: none"
           for t, m in zip(_sample_titles(syn_vals[:k], syn_mask[:k], names), measured)]
  save_mid_slices(np.concatenate([real_v[:k], syn_v[:k]]), out / "real_vs_synthetic_conditioned.png",
                  titles=real_t + syn_t, columns=k)
  return ["real_vs_synthetic_conditioned.png"]


def conditioning_sweep(workdir: pathlib.Path, heldout: pathlib.Path, out: pathlib.Path, spacing, *,
                       steps: int, guidance: float = 1.0, n: int = 6, seed: int = 0) -> str:
  """OUT/conditioning_sweep.png: one row at ED, one at ES; left to right the conditioned LV volume
  rises (10th..90th percentile of the held-out set), everything else at the held-out median, and
  every tile drawn from the same noise (`generate(shared_noise=True)`), so the tiles differ only by
  their conditioning. Titles: conditioned vs measured LV volume. Also sweep/attributes.csv (the
  conditioning) and sweep.json (the measurements, and the seed of the shared noise)."""
  import csv

  import numpy as np

  from jaxldm.data.dataset import read_attributes
  from jaxldm.eval import controllability as ctl
  from jaxldm.infer import generate
  from jaxldm.infer.pictures import save_mid_slices

  info = json.loads((workdir / "ldm.json").read_text())
  names = list(info["attributes"])
  vals, mask = read_attributes(heldout / "attributes.csv", names, strict_ids=False)
  base = {c: float(np.median(vals[mask[:, j] > 0, j])) for j, c in enumerate(names)}
  ef = base.get("lv_ef", 0.55)
  rows, titles = [], []
  for phase, key in ((0, "lv_edv_ml"), (1, "lv_esv_ml")):
    col = vals[mask[:, names.index(key)] > 0, names.index(key)]
    for lv in np.linspace(np.percentile(col, 10), np.percentile(col, 90), n):
      edv, esv = (lv, lv * (1 - ef)) if phase == 0 else (lv / (1 - ef), lv)
      rows.append({**base, "phase": float(phase), "lv_edv_ml": edv, "lv_esv_ml": esv, "lv_ef": ef})
  target = out / "sweep"
  target.mkdir(parents=True, exist_ok=True)
  csv_path = target / "attributes.csv"
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["subject_id", *names])
    for i, r in enumerate(rows):
      w.writerow([f"sweep-{i:03d}", *(r[c] for c in names)])
  # One noise for every tile of both rows (one batch per row).
  volumes, _, _, _ = generate.generate(workdir, len(rows), seed=seed, guidance_scale=guidance, num_steps=steps,
                                       csv_path=csv_path, batch_size=n, shared_noise=True)
  measured = ctl.measure_volumes(volumes, spacing)["lv_volume_ml"]
  for r, m in zip(rows, measured):
    cond = r["lv_esv_ml"] if r["phase"] else r["lv_edv_ml"]
    meas = f"{m:.0f}" if np.isfinite(m) else "none"
    titles.append(f"{'ES' if r['phase'] else 'ED'} cond {cond:.0f} ml\nmeasured {meas}")
  save_mid_slices(volumes, out / "conditioning_sweep.png", titles=titles, columns=n)
  (target / "sweep.json").write_text(json.dumps(
      {"workdir": str(workdir), "seed": seed, "noise": "shared by every tile", "steps": steps, "guidance": guidance,
       "rows": [{"phase": int(r["phase"]),
                 "conditioned_lv_ml": float(r["lv_esv_ml"] if r["phase"] else r["lv_edv_ml"]),
                 "measured_lv_ml": None if not np.isfinite(m) else float(m)} for r, m in zip(rows, measured)]},
      indent=2) + "\n")
  return "conditioning_sweep.png"
