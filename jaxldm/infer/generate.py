"""Sampling a trained LDM to NIfTI: `jaxldm sample --workdir RUN --n 16 --out DIR`.

Attributes are given in their natural units (mL, years, ...) and standardised with the statistics
the model was trained with (ldm.json); a missing attribute is masked, not zero-filled.
"""

from __future__ import annotations

import csv
import functools
import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from rich.progress import track

from jaxldm.config import ConfigError
from jaxldm.data import nifti
from jaxldm.data.dataset import read_attributes
from jaxldm.data.defaults import build_dataset, parse_categories
from jaxldm.diffusion import make_schedule, sample
from jaxldm.eval import safeguard
from jaxldm.infer import checkpoints
from jaxldm.infer.autoencoder import latent_decoder, load_autoencoder
from jaxldm.infer.ldm import build_unet, unet_apply
from jaxldm.models import conv, layers
from jaxldm.privacy.ledger import LEDGER_FILENAME, PrivacyLedger


def load_ldm(workdir: str | pathlib.Path):
  """(unet, EMA params, info, run config dict) of a trained LDM workdir."""
  workdir = pathlib.Path(workdir)
  if not (workdir / "ldm.json").is_file():
    raise FileNotFoundError(f"{workdir} is not an LDM run (no ldm.json); train one with jaxldm train --config ldm")
  info = json.loads((workdir / "ldm.json").read_text())
  config = run_config(workdir)
  unet = build_unet(info["model"], len(info["attributes"]), info["latent_shape"][-1])
  a = len(info["attributes"])
  target = layers.abstract_params(unet, jnp.zeros((1, *info["latent_shape"])), jnp.zeros((1,), jnp.int32),
                                  jnp.zeros((1, a)), jnp.ones((1, a)))
  params, _ = checkpoints.restore_params(workdir / "checkpoints", target)
  return unet, params, info, config


def run_categories(run_config: dict) -> dict[str, tuple[str, ...]]:
  """The run's data.categories ({"sex": ("F", "M")}): names a user may give instead of indices."""
  return parse_categories(run_config.get("data", {}).get("categories") or ())


def sampling_defaults(run_config: dict) -> dict:
  """guidance_scale and num_steps from the run's `sampling` config group (1 and 50 if it has none)."""
  sampling = run_config.get("sampling") or {}
  return {"guidance_scale": float(sampling.get("guidance_scale", 1.0)),
          "num_steps": int(sampling.get("num_steps", 50))}


def _attribute_value(name: str, value, categories: dict[str, tuple[str, ...]]) -> float:
  """--attr NAME=VALUE as the number the model was trained on: a number, or a category name."""
  names = categories.get(name)
  if isinstance(value, str):
    if names is not None and value.strip() in names:
      return float(names.index(value.strip()))
    try:
      value = float(value)
    except ValueError:
      known = f"one of {', '.join(names)} or an index" if names else "a number (the run's config defines no categories for it)"
      raise ConfigError(f"--attr {name}={value}: expected {known}") from None
  if names is not None and (not float(value).is_integer() or not 0 <= value < len(names)):
    raise ConfigError(f"--attr {name}={value:g}: expected one of {', '.join(names)} (or an index 0 to {len(names) - 1})")
  return float(value)


def conditioning(info: dict, n: int, *, csv_path=None, fixed: dict | None = None,
                 categories: dict[str, tuple[str, ...]] | None = None):
  """Raw attribute values (n, A), mask (n, A) and the standardised values the UNet expects.

  fixed: name -> a number or, for the run's data.categories columns, a category name (or index).
  """
  names = list(info["attributes"])
  categories = {k: v for k, v in (categories or {}).items() if k in names}
  values = np.zeros((n, len(names)), np.float32)
  mask = np.zeros((n, len(names)), np.float32)
  if csv_path is not None:
    values, mask = read_attributes(csv_path, names, categories=categories, strict_ids=False)
    if len(values) == 0:
      raise ConfigError(f"{csv_path} has no rows")
    reps = -(-n // len(values))
    values, mask = np.tile(values, (reps, 1))[:n], np.tile(mask, (reps, 1))[:n]
  for name, value in (fixed or {}).items():
    if name not in names:
      raise ConfigError(f"--attribute {name}: the model knows {', '.join(names) or 'no attributes'}")
    j = names.index(name)
    values[:, j], mask[:, j] = _attribute_value(name, value, categories), 1.0
  mean, std = np.asarray(info["attribute_mean"], np.float32), np.asarray(info["attribute_std"], np.float32)
  standardised = (values - mean) / std * mask
  return values, mask, standardised


OUT_OF_RANGE_STD = 3.0


def out_of_range(info: dict, values: np.ndarray, mask: np.ndarray, *, categorical=(), fixed=None) -> list[str]:
  """Warnings for conditioning values outside what the model was trained on.

  Outside [attribute_min, attribute_max] when ldm.json records them, else more than
  OUT_OF_RANGE_STD standard deviations from the training mean; category columns are checked
  by `conditioning` itself.
  """
  names = list(info["attributes"])
  mean, std = info["attribute_mean"], info["attribute_std"]
  lo, hi = info.get("attribute_min"), info.get("attribute_max")
  fixed = fixed or {}
  out = []
  for j, name in enumerate(names):
    if name in categorical:
      continue
    present = values[mask[:, j] > 0, j]
    if lo is not None and hi is not None:
      bad = present[(present < lo[j]) | (present > hi[j])]
      why = f"outside the training range {lo[j]:.4g} to {hi[j]:.4g}"
    else:
      bad = present[np.abs(present - mean[j]) > OUT_OF_RANGE_STD * std[j]]
      why = (f"more than {OUT_OF_RANGE_STD:g} std from the training mean {mean[j]:.4g} "
             f"(std {std[j]:.4g})")
    if bad.size:
      where = f"--attr {name}={bad[0]:g}" if name in fixed else f"{bad.size} {name} value(s) (e.g. {bad[0]:g})"
      out.append(f"{where} is {why}; the model never saw such values, its samples may not follow them")
  return out


def check_conditioning(workdir, n: int, *, csv_path=None, fixed=None) -> list[str]:
  """Validates --attr/--attributes against the run (names, category names) before any model is
  loaded; returns the out-of-range warnings."""
  workdir = pathlib.Path(workdir)
  if not (workdir / "ldm.json").is_file():
    raise FileNotFoundError(f"{workdir} is not an LDM run (no ldm.json); train one with jaxldm train --config ldm")
  info = json.loads((workdir / "ldm.json").read_text())
  categories = run_categories(run_config(workdir))
  values, mask, _ = conditioning(info, n, csv_path=csv_path, fixed=fixed, categories=categories)
  return out_of_range(info, values, mask, categorical=categories, fixed=fixed)


def synthetic_descrip(workdir) -> str:
  """The NIfTI `descrip` of a sample: "jaxldm synthetic; model NAME; epsilon E" (at most 80 bytes).

  E is the run's composed epsilon (privacy_ledger.json) or "non-private".
  """
  workdir = pathlib.Path(workdir)
  info = json.loads((workdir / "ldm.json").read_text())
  eps = "non-private"
  if info.get("private"):
    try:
      eps = f"{PrivacyLedger.load(str(workdir / LEDGER_FILENAME)).composed_epsilon():.3g}"
    except (OSError, ValueError, KeyError):
      eps = "unknown"
  name = workdir.resolve().name
  tail = f"; epsilon {eps}"
  head = "jaxldm synthetic; model "
  room = 80 - len(head.encode()) - len(tail.encode())
  name = name.encode()[:room].decode("utf-8", "ignore")
  return f"{head}{name}{tail}"


def sampler(unet, schedule: tuple, prediction: str, **settings):
  """The jitted sampler (params, shape, key, **conditioning) -> latents of a UNet, schedule
  (name, T, beta_start, beta_end) and sampler settings (`diffusion.sample`'s keywords).

  Built once per process for the same arguments and convolution route, so that a second `generate`
  with the same settings (an evaluation after the demo's figures, the runs of an ablation grid) reuses
  its trace and compiled program instead of tracing the UNet's sampling loop again.
  """
  return _jitted_sampler(unet, tuple(schedule), prediction, tuple(sorted(settings.items())))


@conv.cached_per_route(maxsize=16)
def _jitted_sampler(unet, schedule: tuple, prediction: str, settings: tuple):
  return jax.jit(functools.partial(sample, unet_apply(unet), schedule=make_schedule(*schedule), prediction=prediction,
                                   **dict(settings)),
                 static_argnums=(1,))


def generate(workdir, n: int, *, seed: int = 0, guidance_scale: float = 1.0, method: str = "ddim",
             num_steps: int | None = 50, csv_path=None, fixed=None, batch_size: int = 8,
             return_latents: bool = False, shared_noise: bool = False):
  """Volumes (n, D, H, W) in the training intensity range, plus the conditioning used.

  shared_noise: every volume is drawn from the same noise (that of the first batch's first example),
  so they differ only by their conditioning (the demo's conditioning sweep).

  return_latents: also return the sampler's latents (n, D', H', W', Z), scaled as the UNet saw them,
  as a fifth value (latent-space memorization compares them with the training latents).
  """
  unet, params, info, config = load_ldm(workdir)
  ae_model, ae_params, _ = load_autoencoder(info["autoencoder_workdir"])
  d = info["diffusion"]
  values, mask, standardised = conditioning(info, n, csv_path=csv_path, fixed=fixed,
                                            categories=run_categories(config))
  has_attrs = len(info["attributes"]) > 0
  draw = sampler(unet, (d["schedule"], d["num_timesteps"], d["beta_start"], d["beta_end"]), d["prediction"],
                 guidance_scale=float(guidance_scale), method=method, num_steps=num_steps, shared_noise=shared_noise)
  scale = info["scale_factor"]
  decode = latent_decoder(ae_model, scale)
  out, latents = [], []
  for start in track(range(0, n, batch_size), description="sampling", transient=True):
    b = min(batch_size, n - start)
    kw = {}
    if has_attrs:
      kw = {"attributes": jnp.asarray(standardised[start:start + b]), "attribute_mask": jnp.asarray(mask[start:start + b])}
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0 if shared_noise else start)
    z = draw(params, (b, *info["latent_shape"]), key, **kw)
    out.append(np.asarray(decode(ae_params, z))[..., 0])
    if return_latents:
      latents.append(np.asarray(z))
  if return_latents:
    return np.concatenate(out), values, mask, info, np.concatenate(latents)
  return np.concatenate(out), values, mask, info


def write_volumes(out_dir, volumes: np.ndarray, spacing, *, names=None, attributes=None, mask=None,
                  overwrite: bool = False, prefix: str = "sample", extra_json: dict | None = None,
                  extra_arrays: dict | None = None, descrip: str | None = None) -> pathlib.Path:
  """NIfTI files (`nifti.write_nifti`: voxel axes W, H, D; centred RAS affine from spacing) + attributes.csv, written atomically.

  extra_json: {filename: record} JSON files written into the same directory, in the same atomic
  step (e.g. safeguard.json: the volumes never appear without the record of how they were chosen).
  extra_arrays: {filename.npy: array} written in the same step (e.g. the sampler's latents).
  descrip: the NIfTI header's description (`synthetic_descrip`: marks the files as synthetic).
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    ids = [f"{prefix}-{i:05d}" for i in range(len(volumes))]
    for sid, vol in zip(ids, volumes):  # The one NIfTI writer (and affine rule) of the package.
      nifti.write_nifti(tmp / f"{sid}.nii.gz", np.asarray(vol, np.float32), spacing, descrip=descrip or "")
    if names:
      with open(tmp / "attributes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", *names])
        for i, sid in enumerate(ids):
          w.writerow([sid, *[f"{attributes[i, j]:.6g}" if mask[i, j] else "" for j in range(len(names))]])
    for filename, record in (extra_json or {}).items():
      (tmp / filename).write_text(json.dumps(record, indent=2) + "\n")
    for filename, array in (extra_arrays or {}).items():
      np.save(tmp / filename, np.asarray(array))
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


# ---------------------------------------------------------------------------------------------
# Release safeguard (Shi et al. 2023): sample, compare with every training volume, keep the far ones
# ---------------------------------------------------------------------------------------------
SAFEGUARD_FILENAME = "safeguard.json"
DEFAULT_SAFEGUARD_PERCENTILE = 5.0


def run_config(workdir) -> dict:
  """The config a training run recorded in WORKDIR/config.json, as a dict."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: --workdir must be an LDM training run")
  return json.loads(path.read_text())


def run_data_config(workdir):
  """The `data` config group a training run recorded in WORKDIR/config.json."""
  return ml_collections.ConfigDict(run_config(workdir)["data"])


def training_volumes(workdir, data_dir=None) -> np.ndarray:
  """The LDM run's training volumes (N, D, H, W), preprocessed exactly as its training was.

  The run's config.json holds its `data` group (reorientation, spacing, crop, clipping, intensity
  range); only the root changes when `data_dir` is given (the data may have moved since). Uses the
  same preprocessing cache as training, so a second call is fast.
  """
  data = run_data_config(workdir)
  if data_dir is not None:
    if not pathlib.Path(data_dir).is_dir():
      raise FileNotFoundError(f"--safeguard-data {data_dir}: not a directory of training volumes")
    data.root = str(data_dir)
  volumes, _, _ = build_dataset(data, progress=True).arrays()
  return volumes


def _candidate_sampler(unet, params, info, standardised, mask, *, seed, guidance_scale, method, num_steps,
                       batch_size):
  """(slots, round) -> volumes: the LDM drawn for the given conditioning slots, fresh keys per round.

  Every call draws full batches of `batch_size` (the tail padded with repeated slots, the extra
  volumes dropped) so the jitted sampler compiles once however many candidates a round needs. Keys:
  fold_in(fold_in(PRNGKey(seed), round), batch start).
  """
  ae_model, ae_params, _ = load_autoencoder(info["autoencoder_workdir"])
  d = info["diffusion"]
  draw = sampler(unet, (d["schedule"], d["num_timesteps"], d["beta_start"], d["beta_end"]), d["prediction"],
                 guidance_scale=float(guidance_scale), method=method, num_steps=num_steps, shared_noise=False)
  scale = info["scale_factor"]
  decode = latent_decoder(ae_model, scale)
  has_attrs = len(info["attributes"]) > 0

  def sample_slots(slots: np.ndarray, round_index: int) -> np.ndarray:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), round_index)
    out = []
    for start in track(range(0, len(slots), batch_size), description=f"sampling (round {round_index + 1})",
                       transient=True):
      chunk = slots[start:start + batch_size]
      padded = np.resize(chunk, batch_size)  # Repeats the chunk: static batch shape.
      kw = {}
      if has_attrs:
        kw = {"attributes": jnp.asarray(standardised[padded]), "attribute_mask": jnp.asarray(mask[padded])}
      z = draw(params, (batch_size, *info["latent_shape"]), jax.random.fold_in(key, start), **kw)
      out.append(np.asarray(decode(ae_params, z))[: len(chunk), ..., 0])
    return np.concatenate(out)

  return sample_slots


def generate_safeguarded(workdir, n: int, *, data_dir=None, metric: str = "rmse", threshold: float | None = None,
                         percentile: float = DEFAULT_SAFEGUARD_PERCENTILE, extractor=None, max_rounds: int = 5, seed: int = 0, guidance_scale: float = 1.0, method: str = "ddim",
                         num_steps: int | None = 50, csv_path=None, fixed=None, batch_size: int = 8):
  """Like `generate`, but releases only volumes farther than a threshold from every training volume.

  Candidates are drawn in rounds (rejected slots are redrawn with the same conditioning, more
  candidates per slot when many are rejected) until n are released or `max_rounds` is reached.

  Args:
    data_dir: the training volumes (default: the run's data.root), preprocessed as in training.
    metric: "rmse" (voxel RMSE on volumes in the training intensity range) or "embedding"
      (1 - Pearson correlation of embeddings by `extractor`).
    extractor: for metric "embedding", the embedding network (`jaxldm.eval.features.get_extractor`),
      built by the caller before any sampling, so a missing weight file fails before any work.
    threshold: explicit distance threshold; None: the `percentile`-th percentile of the training
      set's own nearest-neighbour distances (`safeguard.percentile_threshold`).

  Returns:
    (volumes [Nr, D, H, W], values [Nr, A], mask [Nr, A], info, report): only released volumes with
    their conditioning; `report` is what safeguard.json records (aggregates only).
  """
  if metric not in ("rmse", "embedding"):
    raise ConfigError(f"--safeguard-metric must be rmse or embedding, got {metric!r}")
  if metric == "embedding" and extractor is None:
    raise ConfigError("--safeguard-metric embedding needs an embedding network (an extractor)")
  extractor = extractor if metric == "embedding" else None
  train = training_volumes(workdir, data_dir)
  unet, params, info, config = load_ldm(workdir)
  values, mask, standardised = conditioning(info, n, csv_path=csv_path, fixed=fixed,
                                            categories=run_categories(config))
  sampler = _candidate_sampler(unet, params, info, standardised, mask, seed=seed, guidance_scale=guidance_scale,
                               method=method, num_steps=num_steps, batch_size=batch_size)
  reference = train if extractor is None else np.asarray(extractor(train))
  try:
    if threshold is None:
      threshold = safeguard.percentile_threshold(reference, percentile=percentile, metric=metric)
      source = f"{percentile:g}th percentile of the training set's nearest-neighbour distances"
    else:
      source = "explicit (--safeguard-threshold)"
    outcome = safeguard.sample_with_safeguard(sampler, n, reference, threshold, metric=metric,
                                              features_fn=extractor, max_rounds=max_rounds)
  except ValueError as e:  # Includes samples and --safeguard-data volumes of different shapes.
    raise ConfigError(f"safeguard: {e}") from e
  report = {
      "metric": metric,
      "features": None if extractor is None else {"name": getattr(extractor, "name", None),
                                                   "version": getattr(extractor, "version", None)},
      "threshold": float(threshold),
      "threshold_source": source,
      "percentile": percentile if source.endswith("distances") else None,
      "training_data": str(data_dir or config["data"]["root"]),
      "training_volumes": int(len(train)),
      "requested": n,
      "released": int(len(outcome.volumes)),
      "candidates": outcome.candidates,
      "rejected": outcome.rejected,
      "rounds": outcome.rounds,
      "max_rounds": max_rounds,
      "complete": outcome.complete,
      "min_released_distance": float(outcome.min_distances.min()) if len(outcome.min_distances) else None,
  }
  return outcome.volumes, values[outcome.slots], mask[outcome.slots], info, report
