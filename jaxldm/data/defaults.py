"""The `data` config group shared by every stage's config, and the dataset it describes.

Kept in the library (not in configs/) so the autoencoder, LDM, DP and evaluation configs all
describe data the same way and a field added here reaches all of them.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Attributes the phantom benchmark provides that mirror the paper's conditioning set (Daum et al.
# 2024 use 14: LV/RV EDV, ESV, EF, myocardial thickness ED/ES, age, sex, BMI, phase, angle, depth).
PHANTOM_CONDITIONING = (
    "lv_edv_ml", "lv_esv_ml", "lv_ef", "rv_edv_ml", "rv_esv_ml", "rv_ef",
    "myo_thickness_ed_mm", "myo_thickness_es_mm", "age", "sex", "bmi", "phase", "tilt_deg",
)

# shape (D, H, W) and spacing (dz, dy, dx) in mm per size.
SIZES = {
    # Fits a 2-core CPU: 20 mm slices, 3.6 mm in-plane, FOV 120 x 115 x 115 mm.
    "tiny": ((6, 32, 32), (20.0, 3.6, 3.6)),
    # UK Biobank SAX spacing, cropped to the heart.
    "default": ((12, 64, 64), (10.0, 1.8, 1.8)),
    # The paper's volumes: 13 x 96 x 96 at 10 x 1.8 x 1.8 mm (an accelerator size).
    "paper": ((13, 96, 96), (10.0, 1.8, 1.8)),
}


def data_config(size: str = "default", *, root: str = "runs/phantoms/private") -> ml_collections.ConfigDict:
  """The `data` group: where volumes are and how they are preprocessed."""
  if size not in SIZES:
    raise ValueError(f"unknown data size {size!r}; choose one of {', '.join(SIZES)}")
  shape, spacing = SIZES[size]
  c = ml_collections.ConfigDict()
  c.root = root  # Directory of .nii/.nii.gz volumes (one subject or phase per file).
  c.attributes_csv = "auto"  # CSV keyed by subject_id; "auto" = ROOT/attributes.csv if present, "" = none.
  c.attributes = PHANTOM_CONDITIONING  # CSV columns used as conditioning attributes, in token order.
  c.categories = ()  # Non-numeric columns as "column=cat0|cat1|..." (value = category index).
  c.strict_ids = True  # Every volume needs a CSV row and every row a volume; False: ignore extras, mask missing.
  c.shape = shape  # Output (D, H, W) in voxels; D is the through-plane (slice) axis.
  c.spacing = spacing  # Resample to this (dz, dy, dx) in mm; () keeps each file's own spacing.
  c.frame = config_dict.placeholder(int)  # For 4D (cine) files: which frame; None refuses 4D input.
  c.fit = "crop"  # How to reach `shape`: "crop" (centre crop/pad, keeps mm) or "resize" (resample).
  c.clip_percentiles = (0.5, 99.5)  # Intensity percentiles clipped before scaling.
  c.intensity_range = (-1.0, 1.0)  # Output intensity range after clipping.
  c.cache_dir = ""  # Preprocessed-array cache; "" = ROOT/.jaxldm_cache/<preprocessing hash>.
  c.exclude = ""  # File of subject ids to leave out, one a line (jaxldm data prepare --exclude-bad FILE).
  return c


def parse_categories(entries) -> dict[str, tuple[str, ...]]:
  """("sex=F|M",) -> {"sex": ("F", "M")}, with errors naming the config key."""
  from jaxldm.config import ConfigError  # Local: keeps the data package free of CLI concerns.

  out = {}
  for entry in entries:
    column, sep, cats = str(entry).partition("=")
    values = tuple(v.strip() for v in cats.split("|") if v.strip())
    if not sep or not column.strip() or not values:
      raise ConfigError(f"config key 'data.categories': entry {entry!r} must look like 'column=cat0|cat1'")
    out[column.strip()] = values
  return out


def build_dataset(data: ml_collections.ConfigDict, *, progress: bool = False):
  """The `VolumeDataset` a `data` config group describes."""
  from jaxldm.data.dataset import Preprocessing, VolumeDataset, read_exclude_list

  preprocessing = Preprocessing(
      shape=tuple(data.shape) if data.shape else None,
      spacing=tuple(data.spacing) if data.spacing else None,
      frame=data.frame,
      fit=data.fit,
      clip_percentiles=tuple(data.clip_percentiles),
      intensity_range=tuple(data.intensity_range),
  )
  return VolumeDataset(
      data.root,
      preprocessing=preprocessing,
      attributes_csv=data.attributes_csv or None,
      columns=tuple(data.attributes),
      categories=parse_categories(data.categories),
      strict_ids=data.strict_ids,
      cache_dir=data.cache_dir or None,
      progress=progress,
      # .get: run configs recorded before data.exclude existed.
      exclude=read_exclude_list(data.exclude) if data.get("exclude") else (),
  )
