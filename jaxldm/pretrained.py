"""Shipped public models: the demo's starting point, trained on PUBLIC phantoms only.

  python -m jaxldm.pretrained train --out runs/pretrain_tiny           # train (public data only)
  python -m jaxldm.pretrained export --run runs/pretrain_tiny          # -> jaxldm/pretrained_models/tiny/
  python -m jaxldm.pretrained verify                                   # sha256 against record.json

`train` writes public-domain phantoms (their own seed, never the demo's private or held-out
seeds), then trains the tiny autoencoder, the contrastive (SSL) encoder and the latent diffusion
model on them, exactly as the demo's public stages do but longer. `export` keeps only what loading
needs: the EMA parameters of each stage (params.msgpack) and the JSON records the loaders read
(autoencoder.json, encoder.json, ldm.json with the public attribute mean/std), plus record.json
(command, configs, seeds, steps, sha256 of each file). `install(size, dest)` turns them back into
ordinary workdirs (DEST/autoencoder, DEST/ssl, DEST/ldm) that `infer.autoencoder.load_autoencoder`,
`infer.checkpoints.restore_params`, the feature extractor and a DP finetuning run read like any other.

Privacy: the shipped models saw public phantoms only (domain "public"); a DP run on private data
checks the data fingerprint and finds a different one, and takes its attribute statistics from the
shipped ldm.json (`conditioning.stats_from = pretrained`), which are public.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
import sys
import time

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent / "pretrained_models"
STAGES = ("autoencoder", "ssl", "ldm")
PARAMS_FILE = "params.msgpack"
RECORD_FILE = "record.json"
# The JSON records each stage's loaders read (copied as they are; ldm.json's autoencoder_workdir is
# rewritten on install to where the autoencoder lands).
RECORDS = {"autoencoder": ("autoencoder.json", "config.json"),
           "ssl": ("encoder.json", "config.json"),
           "ldm": ("ldm.json", "config.json", "run.json")}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the shipped models of one size are trained (public phantoms only)."""
  n_public: int
  phantom_seed: int
  autoencoder_steps: int
  ssl_steps: int
  ldm_steps: int
  # Per-stage config overrides on top of configs/<stage>.py:<size>.
  overrides: dict = dataclasses.field(default_factory=dict)


RECIPES = {
    # Measured on a 2-core CPU (README "What `make demo` does"). Seed 10: the demo's phantoms use
    # seeds 0 (public), 1 (private) and 2 (held-out). EMA 0.995 for the autoencoder: with the
    # default 0.999 the EMA still weighs the initial parameters by 0.999^steps (0.3 at 1,200).
    "tiny": Recipe(n_public=256, phantom_seed=10, autoencoder_steps=1200, ssl_steps=300, ldm_steps=6000,
                   overrides={"autoencoder": {"optim.ema_decay": 0.995},
                              "ldm": {"optim.warmup_steps": 100,
                                      "train.sample_every": 500, "train.checkpoint_every": 250}}),
}


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def check_stages(stages) -> None:
  """ValueError naming any of `stages` (the --keep-shipped list) that is not a shipped stage."""
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise ValueError(f"--keep-shipped: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")


def train(out: str | pathlib.Path, size: str = "tiny", *, recipe: Recipe | None = None, say=print,
          keep_shipped: tuple[str, ...] = ()) -> pathlib.Path:
  """Trains the public stages into OUT/{phantoms/public,autoencoder,ssl,ldm}; resumes like the demo.

  keep_shipped: stages installed from the shipped models instead of trained (e.g. ("autoencoder",
  "ssl") retrains only the LDM on the shipped first stage); `export` records them as reused.
  """
  from jaxldm import demo
  from jaxldm.data import phantoms
  from jaxldm.data.defaults import SIZES
  from jaxldm.infer.ssl import ENCODER_FILE
  from jaxldm.train import autoencoder, ldm, ssl

  recipe, out = recipe or RECIPES[size], pathlib.Path(out)
  shape, spacing = SIZES[size]
  data = {"data.shape": shape, "data.spacing": spacing}
  public = out / "phantoms/public"
  extra = recipe.overrides
  started = time.perf_counter()

  def clock() -> str:
    return f"({(time.perf_counter() - started) / 60:.1f} min)"

  check_stages(keep_shipped)
  if keep_shipped:
    say(f"shipped {', '.join(keep_shipped)}: installed, not trained")
    install(out, size, stages=tuple(keep_shipped))
  if not (public / "attributes.csv").is_file():
    say(f"public phantoms: {recipe.n_public} (seed {recipe.phantom_seed}) {clock()}")
    phantoms.write_dataset(public, recipe.n_public, domain="public", shape=shape, spacing=spacing,
                           seed=recipe.phantom_seed, progress=True)
  if not (out / "autoencoder/autoencoder.json").is_file():
    say(f"autoencoder ({recipe.autoencoder_steps} steps) {clock()}")
    autoencoder.train_and_evaluate(demo._config("autoencoder", size, {
        **data, "data.root": str(public), "train.steps": recipe.autoencoder_steps}, extra), out / "autoencoder")
  if not (out / "ssl" / ENCODER_FILE).is_file():
    say(f"ssl encoder ({recipe.ssl_steps} steps) {clock()}")
    ssl.train_and_evaluate(demo._config("ssl", size, {
        **data, "data.root": str(public), "train.steps": recipe.ssl_steps}, extra), out / "ssl")
  if not (out / "ldm/run.json").is_file():
    say(f"ldm ({recipe.ldm_steps} steps) {clock()}")
    ldm.train_and_evaluate(demo._config("ldm", size, {
        **data, "data.root": str(public), "autoencoder_workdir": str(out / "autoencoder"),
        "train.steps": recipe.ldm_steps}, extra), out / "ldm")
  say(f"public models trained in {out} {clock()}")
  return out


def export(run: str | pathlib.Path, size: str = "tiny", *, dest: str | pathlib.Path | None = None,
           command: str = "", recipe: Recipe | None = None) -> pathlib.Path:
  """Writes the EMA parameters and loader records of RUN's stages into DEST (the package by default)."""
  import flax.serialization
  import jax
  import numpy as np

  from jaxldm.train import common

  run, recipe = pathlib.Path(run), recipe or RECIPES[size]
  dest = pathlib.Path(dest) if dest is not None else PACKAGE_DIR / size
  record = {"size": size, "command": command, "recipe": dataclasses.asdict(recipe),
            "data": {"domain": "public", "n": recipe.n_public, "seed": recipe.phantom_seed},
            "stages": {}}
  for stage in STAGES:
    src, dst = run / stage, dest / stage
    ckpt = common.Checkpointer(src / "checkpoints")
    step = ckpt.latest_step()
    ema, _ = ckpt.restore_tree("ema_params", step)
    ckpt.close()
    ema = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), ema)
    if dst.exists():
      shutil.rmtree(dst)
    dst.mkdir(parents=True)
    (dst / PARAMS_FILE).write_bytes(flax.serialization.msgpack_serialize(ema))
    for name in RECORDS[stage]:
      if name == "run.json" and not (src / name).is_file():  # Stopped early: the latest checkpoint's record.
        fingerprint = json.loads((src / "ldm.json").read_text())["data_fingerprint"]
        info = {"steps": int(step), "private": False, "data_fingerprint": fingerprint, "stopped_early": True}
      else:
        info = json.loads((src / name).read_text())
      if stage == "ldm" and name == "ldm.json":
        info["autoencoder_workdir"] = "../autoencoder"  # Rewritten to an absolute path on install.
      (dst / name).write_text(json.dumps(info, indent=2) + "\n")
    config = json.loads((src / "config.json").read_text())
    record["stages"][stage] = {
        "step": int(step), "seed": config.get("seed"), "config": config,
        "sha256": {p.name: _sha256(p) for p in sorted(dst.iterdir()) if p.is_file()}}
    if (src / "shipped.json").is_file():  # Installed by train(keep_shipped=...), not trained in RUN.
      record["stages"][stage]["reused_shipped"] = json.loads((src / "shipped.json").read_text())["sha256"]
  (dest / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
  return dest


def available(size: str = "tiny") -> bool:
  return (PACKAGE_DIR / size / RECORD_FILE).is_file()


def verify(size: str = "tiny", root: str | pathlib.Path | None = None) -> dict:
  """Checks every shipped file against record.json's sha256; returns the record."""
  root = pathlib.Path(root) if root is not None else PACKAGE_DIR / size
  path = root / RECORD_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no shipped {size} models (python -m jaxldm.pretrained train/export)")
  record = json.loads(path.read_text())
  for stage, entry in record["stages"].items():
    for name, digest in entry["sha256"].items():
      got = _sha256(root / stage / name)
      if got != digest:
        raise ValueError(f"{root / stage / name}: sha256 {got} differs from record.json's {digest}")
  return record


def install(dest: str | pathlib.Path, size: str = "tiny", *, root: str | pathlib.Path | None = None,
            stages=STAGES, public_root: str | pathlib.Path | None = None) -> dict[str, pathlib.Path]:
  """Verified shipped models -> ordinary workdirs DEST/<stage> (an orbax checkpoint + the records).

  public_root: where the shipped models' public phantoms are on this machine (`write_public`
  rewrites them: same seed, same volumes); recorded as data.root in each config.json (what
  evaluation reads as the training set). Default: left as recorded at training time.
  """
  import flax.serialization
  import orbax.checkpoint as ocp

  from jaxldm.infer import checkpoints

  root = pathlib.Path(root) if root is not None else PACKAGE_DIR / size
  record = verify(size, root)
  dest = pathlib.Path(dest).absolute()
  out = {}
  for stage in stages:
    src, dst = root / stage, dest / stage
    done = dst / RECORDS[stage][0]
    out[stage] = dst
    if done.is_file():
      continue
    if dst.exists():
      shutil.rmtree(dst)
    dst.mkdir(parents=True)
    ema = flax.serialization.msgpack_restore((src / PARAMS_FILE).read_bytes())
    step = int(record["stages"][stage]["step"])
    manager = ocp.CheckpointManager(dst / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    meta = {"shipped": str(root / stage), checkpoints.PARAMETER_SHAPES: checkpoints.parameter_shapes(ema)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"ema_params": ema, "params": ema}),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    manager.close()
    for name in RECORDS[stage][1:] + RECORDS[stage][:1]:  # The stage's own record last: it marks "done".
      info = json.loads((src / name).read_text())
      if stage == "ldm" and name == "ldm.json":
        info["autoencoder_workdir"] = str(dest / "autoencoder")
      if name == "config.json" and public_root is not None:
        info["data"]["root"] = str(pathlib.Path(public_root).absolute())
      (dst / name).write_text(json.dumps(info, indent=2) + "\n")
    (dst / "shipped.json").write_text(json.dumps(
        {"from": str(root / stage), "step": step, "sha256": record["stages"][stage]["sha256"]}, indent=2) + "\n")
  return out


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m jaxldm.pretrained", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("train", help="train the public stages (public phantoms only)")
  p.add_argument("--out", default="runs/pretrain_tiny")
  p.add_argument("--size", default="tiny", choices=sorted(RECIPES))
  p.add_argument("--keep-shipped", default="", metavar="STAGES",
                 help="comma-separated stages (autoencoder,ssl) installed from the shipped models, not trained")
  p = sub.add_parser("export", help="copy a trained run's EMA weights and records into the package")
  p.add_argument("--run", default="runs/pretrain_tiny")
  p.add_argument("--size", default="tiny", choices=sorted(RECIPES))
  p.add_argument("--dest", default=None, help="default: jaxldm/pretrained_models/SIZE")
  p = sub.add_parser("verify", help="check the shipped files against record.json")
  p.add_argument("--size", default="tiny", choices=sorted(RECIPES))
  args = parser.parse_args(argv)
  if args.cmd == "train":
    keep = tuple(s for s in args.keep_shipped.split(",") if s)
    try:
      check_stages(keep)
    except ValueError as e:  # An unknown --keep-shipped stage: named, exit 2, nothing written.
      parser.error(str(e))
    train(args.out, args.size, keep_shipped=keep)
  elif args.cmd == "export":
    cmd = f"python -m jaxldm.pretrained train --out {args.run} --size {args.size}"
    reused = [s for s in STAGES if (pathlib.Path(args.run) / s / "shipped.json").is_file()]
    if reused:
      cmd += f" --keep-shipped {','.join(reused)}"
    print(export(args.run, args.size, dest=args.dest, command=cmd))
  else:
    record = verify(args.size)
    stages = ", ".join(f"{s} step {e['step']}" for s, e in record["stages"].items())
    print(f"ok: {stages}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
