"""The main job end to end: `jaxldm demo` (what `make demo` runs).

  phantoms -> autoencoder (public) -> SSL encoder (public) -> LDM pretraining (public)
  -> DP finetuning (private, epsilon 10) -> sampling + evaluation -> OUT/report.md, report.json

Each stage writes into OUT/<stage>/ and is skipped when its final record exists; an interrupted
stage resumes from its checkpoints (the trainers do that), so re-running the demo continues where it
stopped. The DP stage draws its noise seed from OS entropy (a real private run) and keeps it in
OUT/ldm_dp/dp_secrets.json (0600) so a resumed run continues the same noise stream.
`--size tiny` fits a 2-core CPU; `--size paper` is the paper's geometry for an accelerator.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable

from jaxldm.config import ConfigError, load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


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
  sample_steps: int = 25  # DDIM steps for the evaluation samples.


PLANS = {
    # Measured on a 2-core CPU: see README "What `make demo` does".
    # Held-out = private size: the memorization threshold compares each training volume with its
    # nearest held-out one, and fewer candidates would bias it low (scripts/memorization_check.py).
    "tiny": Plan(n_public=64, n_private=64, n_heldout=64, n_samples=32, autoencoder_steps=250,
                 ssl_steps=100, ldm_steps=350, dp_steps=60),
    "default": Plan(n_public=256, n_private=256, n_heldout=256, n_samples=64, autoencoder_steps=5000,
                    ssl_steps=2000, ldm_steps=10000, dp_steps=2000),
    "paper": Plan(n_public=1000, n_private=1000, n_heldout=1000, n_samples=200, autoencoder_steps=20000,
                  ssl_steps=5000, ldm_steps=50000, dp_steps=5000),
}


def _config(name: str, size: str, overrides: dict, extra: dict):
  overrides = {**overrides, **extra.get(name, {})}
  path = CONFIGS / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"{path} not found: run the demo from a jaxldm checkout (configs/ lives there)")
  return load_config(f"{path}:{size}", overrides)


def run(out: str | pathlib.Path = "runs/demo", size: str = "tiny", *, plan: Plan | None = None,
        overrides: dict[str, dict] | None = None, say: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) every stage; returns the evaluation report.

  plan: replaces PLANS[size] (tests use a miniature one); overrides: extra config overrides per
  stage name ("autoencoder", "ssl", "ldm", "ldm_dp"), e.g. narrower models.
  """
  from jaxldm.data import phantoms
  from jaxldm.data.defaults import SIZES
  from jaxldm.eval import evaluate
  from jaxldm.train import autoencoder, ldm, ssl

  if size not in PLANS:
    raise ConfigError(f"--size {size!r}: choose one of {', '.join(PLANS)}")
  plan, out = plan or PLANS[size], pathlib.Path(out)
  extra = overrides or {}
  shape, spacing = SIZES[size]
  data = {"data.shape": shape, "data.spacing": spacing}
  public, private, heldout = out / "phantoms/public", out / "phantoms/private", out / "phantoms/heldout"
  ae_dir, ssl_dir, ldm_dir, dp_dir = out / "autoencoder", out / "ssl", out / "ldm", out / "ldm_dp"
  stages = 6
  started = time.perf_counter()

  def banner(i: int, text: str, done: bool = False) -> None:
    clock = f"{(time.perf_counter() - started) / 60:.1f} min"
    say(f"[{i}/{stages}] {text}" + (" - done already, skipping" if done else "") + f"  ({clock})")

  # 1. Data: public domain (pretraining), private domain (DP finetuning), held-out private (evaluation).
  todo = [(public, plan.n_public, "public", 0), (private, plan.n_private, "private", 1),
          (heldout, plan.n_heldout, "private", 2)]
  missing = [t for t in todo if not (t[0] / "attributes.csv").is_file()]
  banner(1, f"phantoms: {plan.n_public} public, {plan.n_private} private, {plan.n_heldout} held-out "
            f"{'x'.join(map(str, shape))} volumes", done=not missing)
  for target, n, domain, seed in missing:
    phantoms.write_dataset(target, n, domain=domain, shape=shape, spacing=spacing, seed=seed, progress=True)

  # 2. Autoencoder on public data (frozen afterwards).
  done = (ae_dir / "autoencoder.json").is_file()
  banner(2, f"autoencoder on public phantoms ({plan.autoencoder_steps} steps)", done)
  if not done:
    autoencoder.train_and_evaluate(_config("autoencoder", size, {
        **data, "data.root": str(public), "train.steps": plan.autoencoder_steps}, extra), ae_dir)

  # 3. Self-supervised encoder on public data: the default feature extractor (FID, memorization).
  done = (ssl_dir / ssl.ENCODER_FILE).is_file()
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

  # 5. DP finetuning on private data.
  done = (dp_dir / "run.json").is_file()
  banner(5, f"DP finetuning on private phantoms (epsilon {plan.target_epsilon:g}, delta {plan.delta:g}, "
            f"{plan.dp_steps} steps)", done)
  if not done:
    ldm.train_and_evaluate(_config("ldm_dp", size, {
        **data, "data.root": str(private), "autoencoder_workdir": str(ae_dir), "pretrained_workdir": str(ldm_dir),
        "train.steps": plan.dp_steps, "dp.target_epsilon": plan.target_epsilon, "dp.delta": plan.delta}, extra),
        dp_dir)

  # 6. Sample with the held-out attributes and evaluate against held-out private volumes.
  banner(6, f"sampling {plan.n_samples} volumes and evaluating (FID/KID, memorization, safeguard, "
            "controllability, privacy)")
  report = evaluate.evaluate(dp_dir, heldout, out, evaluate.Options(
      n=plan.n_samples, feature_weights=str(ssl_dir), steps=plan.sample_steps))
  say(f"finished in {(time.perf_counter() - started) / 60:.1f} min")
  return report
