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
import nibabel as nib
import numpy as np

from jaxldm.config import ConfigError
from jaxldm.data.dataset import read_attributes
from jaxldm.diffusion import make_schedule, sample
from jaxldm.models import AutoencoderKL
from jaxldm.train import common, ldm


def load_ldm(workdir: str | pathlib.Path):
  """(unet, EMA params, info, run config dict) of a trained LDM workdir."""
  workdir = pathlib.Path(workdir)
  if not (workdir / "ldm.json").is_file():
    raise FileNotFoundError(f"{workdir} is not an LDM run (no ldm.json); train one with jaxldm train --config configs/ldm.py")
  info = json.loads((workdir / "ldm.json").read_text())
  run_config = json.loads((workdir / "config.json").read_text())
  unet = ldm.build_unet(info["model"], len(info["attributes"]), info["latent_shape"][-1])
  a = len(info["attributes"])
  target = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, *info["latent_shape"])),
                          jnp.zeros((1,), jnp.int32), jnp.zeros((1, a)), jnp.ones((1, a)))
  params, _ = common.restore_params(workdir / "checkpoints", target)
  return unet, params, info, run_config


def conditioning(info: dict, n: int, *, csv_path=None, fixed: dict[str, float] | None = None):
  """Raw attribute values (n, A), mask (n, A) and the standardised values the UNet expects."""
  names = list(info["attributes"])
  values = np.zeros((n, len(names)), np.float32)
  mask = np.zeros((n, len(names)), np.float32)
  if csv_path is not None:
    values, mask = read_attributes(csv_path, names, strict_ids=False)
    if len(values) == 0:
      raise ConfigError(f"{csv_path} has no rows")
    reps = -(-n // len(values))
    values, mask = np.tile(values, (reps, 1))[:n], np.tile(mask, (reps, 1))[:n]
  for name, value in (fixed or {}).items():
    if name not in names:
      raise ConfigError(f"--attribute {name}: the model knows {', '.join(names) or 'no attributes'}")
    j = names.index(name)
    values[:, j], mask[:, j] = value, 1.0
  mean, std = np.asarray(info["attribute_mean"], np.float32), np.asarray(info["attribute_std"], np.float32)
  standardised = (values - mean) / std * mask
  return values, mask, standardised


def generate(workdir, n: int, *, seed: int = 0, guidance_scale: float = 1.0, method: str = "ddim",
             num_steps: int | None = 50, csv_path=None, fixed=None, batch_size: int = 8):
  """Volumes (n, D, H, W) in the training intensity range, plus the conditioning used."""
  unet, params, info, _ = load_ldm(workdir)
  ae_model, ae_params, _ = ldm.load_autoencoder(info["autoencoder_workdir"])
  d = info["diffusion"]
  schedule = make_schedule(d["schedule"], d["num_timesteps"], d["beta_start"], d["beta_end"])
  values, mask, standardised = conditioning(info, n, csv_path=csv_path, fixed=fixed)
  has_attrs = len(info["attributes"]) > 0
  draw = jax.jit(functools.partial(sample, ldm.unet_apply(unet), schedule=schedule, prediction=d["prediction"],
                                   guidance_scale=guidance_scale, method=method, num_steps=num_steps),
                 static_argnums=(1,))
  scale = info["scale_factor"]
  decode = jax.jit(lambda p, z: ae_model.apply(p, z / scale, method=AutoencoderKL.decode))
  out = []
  from rich.progress import track
  for start in track(range(0, n, batch_size), description="sampling", transient=True):
    b = min(batch_size, n - start)
    kw = {}
    if has_attrs:
      kw = {"attributes": jnp.asarray(standardised[start:start + b]), "attribute_mask": jnp.asarray(mask[start:start + b])}
    z = draw(params, (b, *info["latent_shape"]), jax.random.fold_in(jax.random.PRNGKey(seed), start), **kw)
    out.append(np.asarray(decode(ae_params, z))[..., 0])
  return np.concatenate(out), values, mask, info


def write_volumes(out_dir, volumes: np.ndarray, spacing, *, names=None, attributes=None, mask=None,
                  overwrite: bool = False, prefix: str = "sample") -> pathlib.Path:
  """NIfTI files (voxel axes W, H, D; RAS affine = spacing) + attributes.csv, written atomically."""
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    dz, dy, dx = spacing
    affine = np.diag([dx, dy, dz, 1.0])
    ids = [f"{prefix}-{i:05d}" for i in range(len(volumes))]
    for sid, vol in zip(ids, volumes):
      nib.save(nib.Nifti1Image(np.asarray(vol, np.float32).transpose(2, 1, 0), affine), tmp / f"{sid}.nii.gz")
    if names:
      with open(tmp / "attributes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", *names])
        for i, sid in enumerate(ids):
          w.writerow([sid, *[f"{attributes[i, j]:.6g}" if mask[i, j] else "" for j in range(len(names))]])
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
