"""`jaxldm evaluate`: everything the papers measured, for one trained LDM, in one report.

  jaxldm evaluate --workdir runs/ldm_dp --real runs/phantoms/heldout --n 64

Inputs: the LDM run (its config.json says which data it trained on and how they were preprocessed),
a directory of REAL reference volumes that the run did NOT train on (FID/KID reference and the
validation set of the memorization threshold), and a feature extractor (`ssl3d` by default: the
project's own contrastive encoder, trained with `jaxldm train --config configs/ssl.py`).

Sections (each skipped with a reason when it does not apply):
  samples          n volumes drawn with the real set's attributes as conditions (or read from
                   --samples DIR); kept in OUT/samples so a re-run reuses them;
  quality          FID (standard Frechet distance of features), KID (mean, std over subsets),
                   precision/recall, MS-SSIM diversity of samples and of real volumes;
  memorization     Dar et al.: tau = 95th percentile of training->validation nearest correlations,
                   fraction of samples that are copies and of training volumes copied;
  safeguard        Shi et al.: how many samples the release filter would reject (RMSE to every
                   training volume below the 5th percentile of training nearest-neighbour RMSE);
  controllability  phantoms.measure vs the conditioned attributes (phantom data), or a trained
                   attribute regressor (--regressor WORKDIR) for real data;
  privacy          the run's privacy ledger (epsilon, delta, sigma, q, steps) and the ReRo bound.

Writes OUT/report.json, OUT/report.md and figures. Deterministic for a seed.

What may be released (docs/privacy.md). The report separates three kinds of output; report.json
lists each kind's keys at the top level (`release_labels`) and report.md gives each its section:
  covered_by_dp      the samples and the DP run's mechanism and epsilon/delta (post-processing of
                     the released model: the epsilon covers them);
  heldout_reference  FID/KID/precision/recall/diversity and phantom controllability: the samples
                     against the held-out real set, which the epsilon says nothing about;
  data_owner_only    numbers computed from the TRAINING data outside DP: memorization thresholds
                     and copy rates (image and latent), safeguard decisions, a non-DP regressor's
                     controllability, dataset sizes, and figures of real volumes ("For the data
                     owner only — do not release"). `--no-training-images` leaves out the
                     nearest-neighbour figure of training volumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError

REPORT_JSON, REPORT_MD = "report.json", "report.md"
LATENTS_FILE = "latents.npy"  # Next to drawn samples: the sampler's latents (latent-space memorization).


@dataclasses.dataclass
class Options:
  """What `jaxldm evaluate` was asked to do (defaults = the CLI's)."""
  n: int = 64  # Synthetic volumes to draw (ignored with `samples`).
  features: str = "ssl3d"  # Feature extractor name (jaxldm.eval.features.EXTRACTORS).
  feature_weights: str | None = None  # Its weights (ssl3d: workdir; default runs/ssl).
  samples: str | None = None  # Read samples from here instead of drawing them.
  train: str | None = None  # Training data directory (default: the run's data.root).
  seed: int = 0  # Sampling, bootstrap and KID subset seed.
  guidance: float = 1.0  # Classifier-free guidance scale.
  steps: int = 50  # DDIM steps.
  batch_size: int = 8  # Volumes per sampler / extractor call.
  regressor: str | None = None  # Attribute-regressor workdir for controllability on real data.
  training_images: bool = True  # Include the nearest-neighbour figure (shows training volumes).
  kappas: tuple[float, ...] = (0.001, 0.01, 0.1)  # Prior success rates of the ReRo bound.


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_real(data_cfg, root: str | pathlib.Path, what: str):
  """Volumes (N, D, H, W), raw attributes (N, A) + mask, columns: preprocessed as the run was."""
  from jaxldm.data.defaults import build_dataset

  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{what} {root}: not a directory of NIfTI volumes")
  cfg = data_cfg.copy_and_resolve_references()
  cfg.root = str(root)
  cfg.strict_ids = False  # Reference sets may lack attribute rows: they are masked.
  dataset = build_dataset(cfg, progress=True)
  volumes, attributes, mask = dataset.arrays()
  return volumes, attributes, mask, list(dataset.columns)


def read_samples(directory: str | pathlib.Path, columns: list[str]):
  """Volumes as written by `jaxldm sample` (no re-normalisation) and their attributes.csv."""
  from jaxldm.data.dataset import find_volumes, read_attributes
  from jaxldm.data.nifti import read_nifti

  directory = pathlib.Path(directory)
  files = find_volumes(directory)
  if not files:
    raise FileNotFoundError(f"--samples {directory}: no .nii/.nii.gz volumes")
  volumes = np.stack([read_nifti(f)[0] for f in files]).astype(np.float32)
  csv = directory / "attributes.csv"
  if csv.is_file():
    values, mask = read_attributes(csv, columns, strict_ids=False)
  else:
    values = np.zeros((len(volumes), len(columns)), np.float32)
    mask = np.zeros_like(values)
  return volumes, values, mask


def read_latents(directory: str | pathlib.Path) -> np.ndarray | None:
  """The sampler's latents saved next to drawn samples (LATENTS_FILE), or None."""
  path = pathlib.Path(directory) / LATENTS_FILE
  return np.load(path, allow_pickle=False) if path.is_file() else None


def draw_samples(workdir: pathlib.Path, out: pathlib.Path, real_root: pathlib.Path, opts: Options, spacing):
  """n samples conditioned on the real set's attribute rows (cycled), kept in OUT/samples with their latents."""
  from jaxldm.train import generate

  info = json.loads((workdir / "ldm.json").read_text())
  columns = list(info["attributes"])
  target = out / "samples"
  record = target / "sampling.json"
  request = {"workdir": str(workdir.resolve()), "n": opts.n, "seed": opts.seed, "guidance": opts.guidance,
             "steps": opts.steps, "checkpoint": _latest_checkpoint(workdir)}
  if record.is_file() and json.loads(record.read_text()) == request:
    volumes, values, mask = read_samples(target, columns)
    return volumes, values, mask, read_latents(target), "reused"
  csv = real_root / "attributes.csv"
  volumes, values, mask, _, latents = generate.generate(
      workdir, opts.n, seed=opts.seed, guidance_scale=opts.guidance, num_steps=opts.steps,
      csv_path=csv if (csv.is_file() and columns) else None, batch_size=opts.batch_size, return_latents=True)
  generate.write_volumes(target, volumes, spacing, names=columns, attributes=values, mask=mask,
                         overwrite=True, extra_json={"sampling.json": request}, extra_arrays={LATENTS_FILE: latents})
  return volumes, values, mask, latents, "drawn"


def _latest_checkpoint(workdir: pathlib.Path) -> int | None:
  steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps) if steps else None


# ---------------------------------------------------------------------------------------------
# Features (real-set features cached per extractor version)
# ---------------------------------------------------------------------------------------------
def _version_tag(extractor) -> str:
  """Extractor name + a short hash of its version: cache files never mix extractors."""
  return f"{extractor.name}-{hashlib.sha256(extractor.version.encode()).hexdigest()[:12]}"


def _cached_features(extractor, volumes: np.ndarray, cache_dir: pathlib.Path, label: str) -> np.ndarray:
  """Features of a fixed real set, cached by extractor version and a hash of the volumes."""
  digest = hashlib.sha256(np.ascontiguousarray(volumes).tobytes()).hexdigest()[:16]
  path = cache_dir / f"features-{label}-{_version_tag(extractor)}-{digest}.npz"
  if path.is_file():
    with np.load(path, allow_pickle=False) as z:
      if str(z["extractor_version"]) == extractor.version:
        return z["features"]
  feats = extractor(volumes)
  cache_dir.mkdir(parents=True, exist_ok=True)
  with atomic_open(path, "wb") as f:
    np.savez(f, features=feats, extractor_version=np.str_(extractor.version))
  return feats


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def quality(real_f, syn_f, real_v, syn_v, extractor, cache_dir: pathlib.Path, seed: int) -> dict:
  from jaxldm.eval import fid

  stats_path = cache_dir / f"fid-ref-{_version_tag(extractor)}.npz"
  try:
    ref = fid.load_reference_stats(stats_path, extractor=extractor.name, extractor_version=extractor.version)
    if ref.n != len(real_f):
      raise ValueError("reference set changed")
  except (FileNotFoundError, ValueError):
    ref = fid.save_reference_stats(stats_path, real_f, extractor=extractor.name,
                                   extractor_version=extractor.version)
  mu, sigma = fid.feature_statistics(syn_f)
  # Subsets of half the smaller set (at most 1000): with all samples in every subset the spread
  # over subsets would be zero by construction.
  subset = max(2, min(1000, min(len(real_f), len(syn_f)) // 2))
  kid_mean, kid_std = fid.kid(real_f, syn_f, num_subsets=100, subset_size=subset, seed=seed)
  k = max(1, min(3, len(real_f) - 1, len(syn_f) - 1))
  precision, recall = fid.precision_recall(real_f, syn_f, k=k)
  return {
      "extractor": extractor.name, "extractor_version": extractor.version,
      "fid": fid.frechet_distance(ref.mu, ref.sigma, mu, sigma), "kid": kid_mean, "kid_std": kid_std,
      "kid_subset_size": subset, "precision": precision, "recall": recall, "knn_k": k,
      "ms_ssim_diversity_synthetic": _diversity(syn_v, seed),
      "ms_ssim_diversity_real": _diversity(real_v, seed),
      "n_real": len(real_f), "n_synthetic": len(syn_f),
  }


def _diversity(volumes: np.ndarray, seed: int) -> float | None:
  from jaxldm.eval import fid

  try:
    return float(fid.ms_ssim_diversity(volumes, data_range=2.0, seed=seed))
  except (TypeError, ValueError):  # Too few volumes or slices too small for 5 scales.
    return None


def memorization(train_f, val_f, syn_f, syn_v, train_v, out: pathlib.Path, figure: bool,
                 ceiling_f=None) -> dict:
  """Dar et al.'s criterion in the feature extractor's space.

  ceiling_f: features of the autoencoder's reconstructions of the training volumes. An LDM that
  reproduces a training latent exactly still shows the user its reconstruction, so their copy rate
  is the most this criterion can report for this autoencoder (the detection ceiling).
  """
  from jaxldm.eval import memorization as mem

  tau = mem.copy_threshold(train_f, val_f, percentile=95.0)
  rates = mem.copy_rates(syn_f, train_f, tau)
  result = {"tau": float(tau), "percentile": 95.0, "synthetic_copy_rate": rates["synthetic_copy_rate"],
            "train_copied_rate": rates["train_copied_rate"],
            "max_correlation": float(np.max(rates["nn_correlations"])),
            "median_correlation": float(np.median(rates["nn_correlations"])),
            "n_train": len(train_f), "n_validation": len(val_f)}
  warnings = []
  if len(val_f) < len(train_f):
    # tau is the 95th percentile of each training volume's best match among the validation volumes;
    # samples are scored by their best match among the training volumes. With fewer validation than
    # training volumes the first is a best-of-fewer, tau comes out low and fresh samples get flagged
    # (measured: 20% of fresh phantoms with 32 validation vs 64 training, 1.5% with 64 vs 64).
    warnings.append(f"only {len(val_f)} validation volumes for {len(train_f)} training volumes: tau is "
                    "biased low and the copy rate high; use at least as many held-out volumes")
  if ceiling_f is not None:
    ceiling = mem.copy_rates(ceiling_f, train_f, tau)
    result["autoencoder_ceiling"] = ceiling["synthetic_copy_rate"]
    result["autoencoder_median_correlation"] = float(np.median(ceiling["nn_correlations"]))
    if ceiling["synthetic_copy_rate"] < 0.5:
      warnings.append(f"only {ceiling['synthetic_copy_rate']:.0%} of the autoencoder's own reconstructions of the "
                      "training volumes count as copies: an LDM that memorized every training latent would score "
                      "about that, so a low copy rate here does not show the absence of memorization; read the "
                      "latent-space copy rate, or train the autoencoder (or the feature extractor) longer")
  if warnings:
    result["warning"] = "; ".join(warnings)
  if figure:
    mem.save_closest_pairs(syn_v, train_v, rates["nn_indices"], rates["nn_correlations"],
                           out / "nearest_neighbours.png", top=min(8, len(syn_v)))
    result["figure"] = "nearest_neighbours.png"
  return result


def latent_memorization(train_z, val_z, syn_z, source: str) -> dict:
  """Dar et al.'s criterion on the LDM's own output: Pearson correlation of flattened latents.

  The diffusion model learns the distribution of training LATENTS; the autoencoder is fixed and
  public. Here a sample is a copy when its latent correlates with its nearest training latent more
  than tau, the 95th percentile of the training latents' correlation to their nearest held-out
  latent. Neither the autoencoder's reconstruction error nor the feature extractor caps what this
  can see: an LDM that reproduces a training latent scores correlation 1. Aggregates only.
  """
  from jaxldm.eval import memorization as mem

  flat = lambda z: np.asarray(z, np.float64).reshape(len(z), -1)
  tau = mem.copy_threshold(flat(train_z), flat(val_z), percentile=95.0)
  rates = mem.copy_rates(flat(syn_z), flat(train_z), tau)
  return {"tau": float(tau), "percentile": 95.0, "synthetic_copy_rate": rates["synthetic_copy_rate"],
          "train_copied_rate": rates["train_copied_rate"],
          "max_correlation": float(np.max(rates["nn_correlations"])),
          "median_correlation": float(np.median(rates["nn_correlations"])),
          "latents": source, "n_train": len(train_z), "n_validation": len(val_z)}


def safeguard(syn_v, train_v) -> dict:
  from jaxldm.eval import safeguard as sg

  threshold = sg.percentile_threshold(train_v, percentile=5.0, metric="rmse")
  res = sg.apply_safeguard(syn_v, train_v, threshold, metric="rmse")
  released = int(len(res.released_indices))
  return {"metric": "rmse", "threshold": float(threshold), "threshold_source": "5th percentile of training NN RMSE",
          "n": len(syn_v), "released": released, "rejected": len(syn_v) - released,
          "rejected_fraction": (len(syn_v) - released) / max(len(syn_v), 1)}


def controllability_section(syn_v, values, mask, columns, spacing, opts: Options, is_phantom: bool) -> dict:
  from jaxldm.eval import controllability as ctl

  conditioned = {c: np.where(mask[:, j] > 0, values[:, j], np.nan) for j, c in enumerate(columns)}
  if not any(np.any(np.isfinite(v)) for v in conditioned.values()):
    return {"skipped": "the samples were not conditioned on any attribute"}
  if opts.regressor:
    return ctl.regressor_controllability(opts.regressor, syn_v, conditioned, seed=opts.seed)
  if is_phantom:
    return ctl.controllability(syn_v, spacing, conditioned, seed=opts.seed, progress=True)
  return {"skipped": "not phantom data: pass --regressor WORKDIR (jaxldm train --config configs/regressor.py)"}


def privacy_section(workdir: pathlib.Path, kappas) -> dict:
  from jaxldm.privacy import reconstruction
  from jaxldm.privacy.ledger import LEDGER_FILENAME

  path = workdir / LEDGER_FILENAME
  if not path.is_file():
    return {"private": False, "epsilon": float("inf"), "note": "non-private run: no privacy ledger"}
  ledger = json.loads(path.read_text())
  out = {"private": True, **{k: ledger.get(k) for k in (
      "epsilon_so_far", "delta", "noise_multiplier", "sampling_rate", "steps", "l2_clip_norm", "dataset_size",
      "accountant", "target_epsilon", "noise_seed_provenance")}}
  out["epsilon"] = out.pop("epsilon_so_far")
  if ledger.get("upstream"):  # Earlier DP stages on the same private data (docs/privacy.md, "Stages compose").
    from jaxldm.privacy.ledger import PrivacyLedger
    out["stages"] = [dict(u) for u in ledger["upstream"]]
    out["composed_epsilon"] = PrivacyLedger.load(str(path)).composed_epsilon()
  if ledger.get("steps", 0) > 0 and ledger.get("noise_multiplier", 0) > 0:
    out["rero"] = reconstruction.rero_summary(noise_multiplier=ledger["noise_multiplier"],
                                              sampling_rate=ledger["sampling_rate"], steps=ledger["steps"],
                                              kappas=kappas)
  return out


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------
def evaluate(workdir, real, out, opts: Options | None = None, *,
             status: Callable[[str], None] = lambda _: None) -> dict:
  """Runs every section that applies and writes OUT/report.json, OUT/report.md and figures."""
  from jaxldm.eval.features import get_extractor
  from jaxldm.train.common import save_mid_slices

  opts = opts or Options()
  workdir, real, out = pathlib.Path(workdir), pathlib.Path(real), pathlib.Path(out)
  if not (workdir / "ldm.json").is_file():
    raise FileNotFoundError(f"--workdir {workdir}: not an LDM run (no ldm.json)")
  if opts.samples is None and opts.n < 2:
    raise ConfigError(f"--n {opts.n}: FID and KID need at least 2 samples")
  out.mkdir(parents=True, exist_ok=True)
  from jaxldm.train.generate import run_data_config

  data_cfg = run_data_config(workdir)
  info = json.loads((workdir / "ldm.json").read_text())
  columns = list(info["attributes"])
  spacing = tuple(data_cfg.spacing) if data_cfg.spacing else (1.0, 1.0, 1.0)
  train_root = pathlib.Path(opts.train or data_cfg.root)
  if train_root.resolve() == real.resolve():
    raise ConfigError(f"--real {real} is the run's training data: pass held-out real volumes (the FID "
                      "reference and the memorization validation set must not be training volumes)")

  status("loading real and training volumes")
  real_v, _, _, _ = load_real(data_cfg, real, "--real")
  train_v, _, _, _ = load_real(data_cfg, train_root, "training data")
  status("sampling")
  if opts.samples:
    syn_v, values, mask = read_samples(opts.samples, columns)
    syn_z = read_latents(opts.samples)
    how = f"read from {opts.samples}"
  else:
    syn_v, values, mask, syn_z, how = draw_samples(workdir, out, real, opts, spacing)
  if syn_v.shape[1:] != real_v.shape[1:]:
    raise ConfigError(f"samples have shape {syn_v.shape[1:]} but the real volumes {real_v.shape[1:]} "
                      "after the run's preprocessing")

  status(f"features ({opts.features})")
  extractor = get_extractor(opts.features, weights=opts.feature_weights, batch_size=opts.batch_size)
  cache = out / "cache"
  real_f = _cached_features(extractor, real_v, cache, "real")
  train_f = _cached_features(extractor, train_v, cache, "train")
  syn_f = extractor(syn_v)
  status("latents (autoencoder)")
  from jaxldm.train import ldm

  ae_model, ae_params, _ = ldm.load_autoencoder(info["autoencoder_workdir"])
  encode = lambda v: ldm.encode_latents(ae_model, ae_params, v, float(info["scale_factor"]), opts.batch_size)
  train_z, real_z = encode(train_v), encode(real_v)
  latent_source = "sampler"
  if syn_z is None or syn_z.shape != (len(syn_v), *train_z.shape[1:]):
    # Samples without their latents (e.g. from `jaxldm sample`): re-encoding loses what the
    # autoencoder's round trip loses, so this rate is a lower bound.
    syn_z, latent_source = encode(syn_v), "re-encoded from the sample volumes (a lower bound)"
  recon_v = ldm.decode_latents(ae_model, ae_params, train_z, float(info["scale_factor"]), opts.batch_size)
  ceiling_f = _cached_features(extractor, recon_v, cache, "train-recon")

  report: dict[str, Any] = {
      "workdir": str(workdir), "real": str(real), "train": str(train_root),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "samples": {"n": len(syn_v), "how": how, "guidance": opts.guidance, "steps": opts.steps, "seed": opts.seed},
      "extractor": {"name": extractor.name, "version": extractor.version,
                    "preprocessing": extractor.preprocessing},
  }
  status("quality")
  report["quality"] = quality(real_f, syn_f, real_v, syn_v, extractor, cache, opts.seed)
  status("memorization")
  report["memorization"] = memorization(train_f, real_f, syn_f, syn_v, train_v, out, opts.training_images,
                                        ceiling_f=ceiling_f)
  report["latent_memorization"] = latent_memorization(train_z, real_z, syn_z, latent_source)
  status("safeguard")
  report["safeguard"] = safeguard(syn_v, train_v)
  status("controllability")
  report["controllability_details"] = controllability_section(syn_v, values, mask, columns, spacing, opts,
                                                      (real / "phantoms.json").is_file())
  status("privacy")
  report["privacy"] = privacy_section(workdir, opts.kappas)
  k = min(8, len(real_v), len(syn_v))
  save_mid_slices(np.concatenate([real_v[:k], syn_v[:k]]), out / "real_vs_synthetic.png",
                  titles=[f"real {i}" for i in range(k)] + [f"synthetic {i}" for i in range(k)], columns=k)
  report["figures"] = ["real_vs_synthetic.png"] + ([report["memorization"]["figure"]]
                                                   if "figure" in report["memorization"] else [])
  report.update(headline(report))
  report.update(release_labels(report))
  write(report, out)
  return report


def headline(report: dict) -> dict:
  """The flat keys a study or the demo reads (epsilon, fid, kid, copy_rate, controllability, ...)."""
  ctl = report.get("controllability_details", {})
  per_attribute = {k: v.get("pearson_r") for k, v in ctl.get("attributes", {}).items()}
  rero = report["privacy"].get("rero")
  return {
      "epsilon": report["privacy"].get("epsilon"), "delta": report["privacy"].get("delta"),
      "fid": report["quality"]["fid"], "kid": report["quality"]["kid"],
      "copy_rate": report["memorization"]["synthetic_copy_rate"],
      "train_copied_rate": report["memorization"]["train_copied_rate"],
      "latent_copy_rate": (report.get("latent_memorization") or {}).get("synthetic_copy_rate"),
      "safeguard_rejected_fraction": report["safeguard"]["rejected_fraction"],
      "controllability": per_attribute,
      "rero_bound": dict(zip((str(k) for k in rero["kappas"]), rero["bounds"])) if rero else None,
  }


REGRESSOR_NOTE = "a regressor trained without DP on real data"


def _controllability_private(report: dict) -> bool:
  """True when controllability came from a non-DP model of real data (--regressor), not phantoms.measure."""
  source = (report.get("controllability_details") or {}).get("source")
  return source is not None and source != "phantoms.measure"


def release_labels(report: dict) -> dict:
  """Which report keys and OUT files may leave the data owner (docs/privacy.md).

  Entries are top-level report keys, "section.key" for one field of a section, or paths under OUT
  (a name with "/" or a file extension). Keys in none of the lists are run metadata (paths, dates,
  the extractor, the figure list).
  """
  private = bool(report["privacy"].get("private"))
  samples_dir = report["samples"].get("how") in ("drawn", "reused")  # Written to OUT/samples.
  ctl = ["controllability", "controllability_details"]
  # Every field of the privacy section but the dataset size (the data owner's, below).
  covered = (["epsilon", "delta", "rero_bound", "samples"]
             + [f"privacy.{k}" for k in report["privacy"] if k != "dataset_size"]) if private else []
  if private and samples_dir:
    covered += ["samples/"]  # The volumes and latents.npy; not their attributes.csv (below).
  heldout = ["quality", "fid", "kid"] + ([] if _controllability_private(report) else ctl)
  if samples_dir:
    heldout.append("samples/attributes.csv")  # The conditions: the held-out set's attribute rows.
  owner = ["memorization", "latent_memorization", "safeguard", "copy_rate", "train_copied_rate",
           "latent_copy_rate", "safeguard_rejected_fraction"]
  owner += ctl if _controllability_private(report) else []
  owner += ["privacy.dataset_size"] if private else ["samples"] + (["samples/"] if samples_dir else [])
  owner += [f for f in report.get("figures", [])]  # Real volumes: held-out and (nearest neighbours) training.
  return {
      "covered_by_dp": covered, "heldout_reference": heldout, "data_owner_only": owner,
      "release_notes": {
          "covered_by_dp": ("post-processing of the DP-trained model: the epsilon/delta of report['privacy'] "
                            "covers its training data" if private else
                            "non-private run: nothing in this report is covered by DP; the samples may "
                            "reproduce training data and are listed under data_owner_only"),
          "heldout_reference": ("the samples measured against the held-out real reference set: they add "
                                "nothing about the training data beyond the samples, but DP does not protect "
                                "the held-out set; aggregates only, release them if its owner agrees"),
          "data_owner_only": ("computed from the training data (or a non-DP model of real data) outside the "
                              "DP mechanism, or images of real volumes: for the data owner only, do not "
                              "release"),
      },
  }


def summary(report: dict) -> str:
  """The lines `jaxldm evaluate` and `jaxldm demo` print at the end, labelled as report.md is."""
  bound = report.get("rero_bound") or {}
  line = f"epsilon {report['epsilon']:.3g} (delta {report['delta']})"
  if bound:
    kappa, value = next(iter(bound.items()))
    line += f"  ReRo bound (prior {kappa}) {value:.3g}"
  line += f"  FID {report['fid']:.4g}  KID {report['kid']:.4g}"
  owner = (f"for the data owner only (do not release): copy rate {report['copy_rate']:.3f}"
           + (f" (latent {report['latent_copy_rate']:.3f})" if report.get("latent_copy_rate") is not None else "")
           + f"  safeguard rejects {report['safeguard_rejected_fraction']:.3f}")
  ctl = ", ".join(f"{k} r={v:.2f}" for k, v in (report["controllability"] or {}).items() if v is not None)
  if ctl and _controllability_private(report):
    owner += f"  controllability ({REGRESSOR_NOTE}): {ctl}"
  elif ctl:
    line += f"\ncontrollability: {ctl}"
  return f"{line}\n{owner}"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fmt(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    if not np.isfinite(x):
      return "inf" if x > 0 else ("nan" if np.isnan(x) else "-inf")
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
  return str(x)


OWNER_HEADING = "## For the data owner only — do not release"
RELEASED_HEADING = "## Released under DP"
HELDOUT_HEADING = "## Against the held-out reference set"


def _composed_lines(p: dict) -> list[str]:
  """The composed epsilon of every DP stage that touched the same private data (docs/privacy.md,
  "Stages compose"); none when this run is the only one."""
  if not p.get("stages"):
    return ["", "No other DP stage trained on this private data: this run's epsilon is the pipeline's."]
  lines = ["", "Stages trained on the same private data (composed by dp-accounting, same accountant and delta):", "",
           "| stage | steps | sigma | q | epsilon |", "|---|---|---|---|---|"]
  for st in p["stages"]:
    lines.append(f"| {st['stage']} ({st['workdir']}) | {st['steps']} | {_fmt(st['noise_multiplier'])} | "
                 f"{_fmt(st['sampling_rate'])} | {_fmt(st['epsilon'])} |")
  lines.append(f"| this run | {p['steps']} | {_fmt(p['noise_multiplier'])} | {_fmt(p['sampling_rate'])} | "
               f"{_fmt(p['epsilon'])} |")
  lines += ["", f"**Composed epsilon of the pipeline: {_fmt(p['composed_epsilon'])}** at delta {_fmt(p['delta'])}."]
  return lines


def _privacy_lines(p: dict) -> list[str]:
  if not p.get("private"):
    return [f"{p.get('note', 'non-private run')}: nothing in this report is covered by DP. The samples of a "
            "non-private model may reproduce its training data; they are listed with the data owner's outputs."]
  lines = ["| metric | value |", "|---|---|", f"| epsilon (delta) | {_fmt(p['epsilon'])} ({_fmt(p['delta'])}) |"]
  for kappa, bound in zip((p.get("rero") or {}).get("kappas", []), (p.get("rero") or {}).get("bounds", [])):
    lines.append(f"| ReRo bound at prior {kappa} | {_fmt(bound)} |")
  lines += ["", f"epsilon {_fmt(p['epsilon'])} at delta {_fmt(p['delta'])} ({p['accountant']} accountant), "
            f"sigma {_fmt(p['noise_multiplier'])}, q {_fmt(p['sampling_rate'])}, {p['steps']} steps, "
            f"C {_fmt(p['l2_clip_norm'])}; noise seed: {p['noise_seed_provenance']}."]
  lines += _composed_lines(p)  # The composed epsilon (stages composed) goes here.
  lines += ["", "epsilon covers the diffusion model's training data only (not the public pretraining data, "
            "and not the autoencoder unless it was trained with DP). Covered: the samples (volumes and "
            "latents) and the model's parameters, with the numbers in this section."]
  return lines


def _controllability_lines(ctl: dict) -> list[str]:
  lines = [f"Source: {ctl.get('source', '-')}; n = {ctl.get('n', '-')}.", "",
           "| attribute | conditioned on | Pearson r [CI] | MAE | n used |", "|---|---|---|---|---|"]
  for name, a in ctl.get("attributes", {}).items():
    ci = a.get("pearson_r_ci") or [None, None]
    lines.append(f"| {name} | {a.get('conditioned_on', '-')} | {_fmt(a.get('pearson_r'))} "
                 f"[{_fmt(ci[0])}, {_fmt(ci[1])}] | {_fmt(a.get('mae'))} | {a.get('n', '-')} |")
  for name, c in ctl.get("categorical", {}).items():
    lines.append(f"\n{name}: accuracy {_fmt(c.get('accuracy'))}" +
                 (f", AUROC {_fmt(c.get('auroc'))}" if c.get("auroc") is not None else ""))
  return lines


def markdown(report: dict) -> str:
  """Three sections: released under DP, measured against the held-out set, and the data owner's."""
  q, m, s, p = report["quality"], report["memorization"], report["safeguard"], report["privacy"]
  lm = report.get("latent_memorization") or {}
  ex = report["extractor"]
  ctl = report["controllability_details"]
  ctl_private = _controllability_private(report)
  lines = [f"# jaxldm evaluation of `{report['workdir']}`", "",
           f"{report['created']}; {report['samples']['n']} samples ({report['samples']['how']}); real reference "
           f"`{report['real']}`; training data `{report['train']}`.", "",
           "report.json lists what each section holds: `covered_by_dp`, `heldout_reference` and "
           "`data_owner_only` (docs/privacy.md).", "",
           RELEASED_HEADING, "", *_privacy_lines(p), "",
           HELDOUT_HEADING, "",
           "The samples against the held-out real volumes: nothing about the training data beyond the samples, "
           "but DP does not protect the held-out set (aggregates only; release them if its owner agrees).", "",
           "| metric | value |", "|---|---|",
           f"| FID ({ex['name']}) | {_fmt(q['fid'])} |",
           f"| KID ({ex['name']}) | {_fmt(q['kid'])} ± {_fmt(q['kid_std'])} |",
           f"| precision / recall | {_fmt(q['precision'])} / {_fmt(q['recall'])} |",
           f"| MS-SSIM diversity synthetic / real | {_fmt(q['ms_ssim_diversity_synthetic'])} / "
           f"{_fmt(q['ms_ssim_diversity_real'])} |",
           "", f"Features: `{ex['name']}` version `{ex['version']}` ({ex['preprocessing']}). Every feature-based "
           "number in this report (these and the image-space memorization numbers) comes from this extractor.", ""]
  if not ctl_private:
    lines += ["### Controllability", ""]
    lines += [f"Skipped: {ctl['skipped']}.", ""] if "skipped" in ctl else [*_controllability_lines(ctl), ""]

  n_train = p.get("dataset_size") if p.get("private") else m.get("n_train")
  lines += [OWNER_HEADING, "",
            "*Computed from the training data (or a non-DP model of real data) outside the DP mechanism, or "
            "images of real volumes: the epsilon does not cover anything in this section. Keep it with the "
            "data owner; do not release it.*", "",
            "| metric | value |", "|---|---|",
            f"| copy rate (synthetic that are copies) | {_fmt(m['synthetic_copy_rate'])} |",
            f"| training volumes copied | {_fmt(m['train_copied_rate'])} |",
            f"| latent copy rate / training latents copied | {_fmt(lm.get('synthetic_copy_rate'))} / "
            f"{_fmt(lm.get('train_copied_rate'))} |",
            f"| safeguard would reject | {s['rejected']} of {s['n']} (RMSE threshold {_fmt(s['threshold'])}) |",
            f"| training set size | {_fmt(n_train)} |",
            f"| memorization validation volumes | {_fmt(m['n_validation'])} |"]
  if not p.get("private"):
    lines += ["", "The samples (OUT/samples) of this non-private model: not covered by DP."]
  lines += ["", "### Memorization (Dar et al. 2023)", "",
            f"tau = {_fmt(m['tau'])} (95th percentile of each training volume's correlation to its nearest of "
            f"{m['n_validation']} validation volumes); a sample whose nearest training volume correlates above "
            f"tau is a copy. Max / median nearest correlation: {_fmt(m['max_correlation'])} / "
            f"{_fmt(m['median_correlation'])}."]
  if "autoencoder_ceiling" in m:
    lines += ["", f"Detection ceiling: {_fmt(m['autoencoder_ceiling'])} of the autoencoder's reconstructions of the "
              f"training volumes count as copies (median correlation {_fmt(m['autoencoder_median_correlation'])}): "
              "an LDM that memorized every training latent would score about that."]
  if "warning" in m:
    lines += ["", f"**Warning:** {m['warning']}."]
  if lm:
    lines += ["", "Latent space (the LDM's own output, before decoding): tau = "
              f"{_fmt(lm['tau'])} from training vs held-out latents; copy rate {_fmt(lm['synthetic_copy_rate'])}, "
              f"training latents copied {_fmt(lm['train_copied_rate'])}, max / median nearest correlation "
              f"{_fmt(lm['max_correlation'])} / {_fmt(lm['median_correlation'])}; sample latents: {lm['latents']}."]
  if ctl_private:
    lines += ["", f"### Controllability ({REGRESSOR_NOTE})", "", *_controllability_lines(ctl)]
  lines += ["", "### Figures", "", "![real vs synthetic](real_vs_synthetic.png)", "",
            "*Shows held-out real volumes next to samples.*"]
  if "figure" in m:
    lines += ["", f"![nearest neighbours]({m['figure']})", "",
              "*Shows training volumes next to their nearest samples.*"]
  return "\n".join(lines + [""])


def write(report: dict, out: pathlib.Path) -> None:
  with atomic_open(out / REPORT_JSON, "w") as f:
    json.dump(report, f, indent=2, default=_json_default, allow_nan=True)
    f.write("\n")
  with atomic_open(out / REPORT_MD, "w") as f:
    f.write(markdown(report))
