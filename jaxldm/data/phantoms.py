"""Procedural cardiac MRI phantoms with exactly known attributes.

Why this exists: controllability of a conditional generator ("does a volume
generated for LV volume 150 mL really hold 150 mL?") can only be scored
exactly on data whose ground truth is known. This module draws synthetic
short-axis (SAX) cine-like volumes whose attributes are true by construction,
and a classical (learning-free) `measure` that recovers them from any volume,
real, phantom or generated.

Coordinates. Volumes are float32 (D, H, W) with D the slice (through-plane)
axis and spacing (dz, dy, dx) in mm. World coordinates are mm with the origin
at the FOV centre: voxel (d, h, w) sits at z = (d - (D-1)/2) dz,
y = (h - (H-1)/2) dy, x = (w - (W-1)/2) dx. Everything is defined in these
physical units, so any shape/spacing renders the same anatomy.

Geometry model (per subject and phase):
  * Heart-aligned frame: long axis `a` tilted from +z by `tilt_deg`
    (half-normal, per-domain sd) towards a uniform azimuth; u = distance along `a` from the base plane (u = 0)
    towards the apex; (v, w) span the cross-section, v along the projection of
    +x, w along the projection of +y, so the in-plane polar angle phi is
    measured from +x towards +y (exactly so when the tilt is 0).
  * LV cavity: superellipsoid of revolution, radius
    r_c(u) = R (1 - (u/L)^p)^(1/p), 0 <= u <= L, with p = 3 (more cylindrical
    than an ellipsoid near the base). Its volume is pi R^2 L c_p with
    c_p = int_0^1 (1 - t^p)^(2/p) dt, so (R, L) follow exactly from the drawn
    cavity volume and aspect L/R.
  * LV myocardium: the outer body r_o(u) = (R+T)(1 - (u/(L+T))^p)^(1/p) minus
    the cavity; T is the wall thickness (exact at the basal rim and the apex;
    the radial thickness at 0.1..0.7 L is within +0..3% of it). The
    myocardial volume pi c_p ((R+T)^2 (L+T) - R^2 L) is conserved between
    end-diastole (ED) and end-systole (ES); T_es is solved from it, hence
    T_es > T_ed always, as in real hearts.
  * RV cavity: a crescent wrapped around the LV outer body: in polar
    coordinates about the LV axis, r_o(u) <= rho < r_o(u) + s h(u) g(phi),
    with h(u) = sqrt(1 - (u/L_rv)^2) (L_rv = 0.85 L) and
    g(phi) = sqrt((cos(phi - rv_angle) - cos Phi) / (1 - cos Phi)) over the
    half-span Phi = 105 deg. The septum is therefore LV myocardium. The area of
    each cross-section is s A(u) + s^2 B(u), so the RV volume is a quadratic
    in the size scale s, solved in closed form (the u-integrals use
    Gauss-Legendre quadrature, exact to ~1e-9): the attribute is the true
    volume of the rendered shape. A 3 mm myocardium-like free wall covers it.
  * Surroundings: tissue (intermediate intensity, smooth low-frequency
    texture), two lungs (dark ellipsoidal blobs lateral/posterior to the
    heart, kept >= 10 mm from it), optionally a thin bright epicardial fat
    patch on the lateral LV wall.
  * Placement: the heart (both phases) must fit inside the FOV with a 1 mm
    margin. The base plane sits 0.5..1.2 slices below the top (d = 0) edge,
    clamped so the apex and its wall stay inside; the in-plane bounding box of
    LV+RV is centred on the FOV centre plus a random offset, clamped inside.
    If the heart does not fit, L is first shortened (at constant volume) down
    to the smallest aspect, then the whole heart is scaled down uniformly;
    the attributes always describe what is rendered. At the default FOV
    (120 x 115 x 115 mm) this scales ~2% of private and ~20% of public hearts
    (large, dilated or tilted ones), by a median 4% in length.

Rendering: voxels are supersampled (about 2 mm through-plane and <= 0.9 mm
in-plane, at least 2 samples per axis; through-plane offsets staggered per
in-plane sample, so planes parallel to the slices are resolved 4x finer) and
get the class fractions of their samples, so thick slices show real partial
volume; rendered volumes match the closed-form ones within ~0.5%. Only voxels
near a class boundary are supersampled (identical result, ~3x faster). The
texture multiplies the tissue fraction. Intensity is
sum_k frac_k I_k (bSSFP-like: bright blood and fat, dark myocardium,
intermediate tissue, darker lungs), times a smooth multiplicative bias field
exp(b f(x)) with f a random quadratic polynomial scaled to max |f| = 1, then
Rician noise sqrt((I + n1)^2 + n2^2), n ~ N(0, sigma^2). Intensities are in
arbitrary units of roughly 0..1.2 (not normalised). Labels, when asked for,
are the argmax of the fractions of background, LV blood pool (1), LV
myocardium (2) and RV blood pool (3); the RV free wall, fat, lungs and tissue
are background (0).

Domains: a controlled shift between a "public" multi-centre, pathological
cohort (ACDC/M&Ms-like) and a "private" healthy-ish population cohort
(UK-Biobank-like); every number lives in one frozen `DomainParams` per domain
(see `DOMAIN_PARAMS`), written to phantoms.json by `write_dataset`.

Determinism: subject i of (seed, domain) uses the generator seeded with
`np.random.SeedSequence([seed, domain_index, i])`, split into independent
streams for the anatomy, the layout/appearance and the noise, so subject i is
bitwise the same whatever n is, and its anatomy draws do not depend on the
shape, spacing or phase asked for (only the fit to a too-small FOV can change
them). Bitwise identity holds for one machine and numpy build; numpy's SIMD
cbrt/cos/exp may differ in the last ulp across CPU families.

Measurement: `measure` segments any SAX-like volume classically (see its
docstring); on 200 default private phantoms it recovers LV volume and wall
thickness with Pearson r > 0.99.

File storage (`write_dataset`): NIfTI-1 with voxel axes (i, j, k) = (W, H, D),
i.e. `volume.transpose(2, 1, 0)`, and affine diag(dx, dy, dz) plus a
translation that puts the FOV centre at world (0, 0, 0). The axes already
point +x, +y, +z (RAS), so a loader that reorients to RAS does no flips and,
taking the thickest axis as D, recovers (D, H, W) exactly. Files are
gzip-compressed with mtime 0, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import integrate, ndimage, optimize

from jaxldm.data.errors import DataError

# Column order of the attribute table (attributes.csv and `generate`).
ATTRIBUTES: tuple[str, ...] = (
    # --- per subject (identical for the ED and ES volume of a subject) ---
    "lv_edv_ml",            # LV cavity volume at end-diastole, mL.
    "lv_esv_ml",            # LV cavity volume at end-systole, mL.
    "lv_ef",                # LV ejection fraction (EDV - ESV) / EDV, 0..1.
    "rv_edv_ml",            # RV cavity volume at end-diastole, mL.
    "rv_esv_ml",            # RV cavity volume at end-systole, mL.
    "rv_ef",                # RV ejection fraction (EDV - ESV) / EDV, 0..1.
    "myo_thickness_ed_mm",  # LV wall thickness T at ED, mm.
    "myo_thickness_es_mm",  # LV wall thickness T at ES, mm (> ED).
    "age",                  # Age, years.
    "sex",                  # 0 female, 1 male.
    "bmi",                  # Body-mass index, kg/m^2.
    # --- per volume (the rendered phase and pose) ---
    "phase",                # 0 end-diastole, 1 end-systole.
    "lv_volume_ml",         # LV cavity volume at this phase, mL.
    "rv_volume_ml",         # RV cavity volume at this phase, mL.
    "myo_thickness_mm",     # LV wall thickness T at this phase, mm.
    "myo_volume_ml",        # LV myocardium volume, mL (same at ED and ES).
    "tilt_deg",             # Angle between the LV long axis and the slice normal, deg.
    "rv_angle_deg",         # In-plane direction LV axis -> RV, deg from +x towards +y.
    "center_y_mm",          # LV cavity centroid minus FOV centre along +y (H axis), mm.
    "center_x_mm",          # LV cavity centroid minus FOV centre along +x (W axis), mm.
)

DOMAINS: tuple[str, ...] = ("public", "private")
PHASES: tuple[str, ...] = ("random", "ed", "es")
LABELS: dict[int, str] = {
    0: "background", 1: "LV blood pool", 2: "LV myocardium", 3: "RV blood pool"}
# Keys returned by `measure`.
MEASURED: tuple[str, ...] = (
    "lv_volume_ml", "rv_volume_ml", "myo_thickness_mm", "center_y_mm",
    "center_x_mm")

_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DomainParams:
  """Every number that distinguishes one domain (cohort + scanner) from another.

  Volumes in mL, lengths in mm, angles in degrees, intensities in the
  arbitrary units of the rendered volume (before bias and noise).
  """
  name: str
  # Demographics.
  age_range: tuple[float, float]
  male_fraction: float
  bmi_mean: float
  bmi_sd: float
  # LV size and function. EDV is the sex median at age 60 and BMI 26, times
  # (1 + bmi_gain (bmi - 26)) (1 - age_gain (age - 60)) exp(N(0, log_sd)),
  # times (dilation_ef / EF)^dilation_power when EF < dilation_ef.
  lv_edv_female_ml: float
  lv_edv_male_ml: float
  lv_edv_log_sd: float
  lv_edv_bmi_gain: float
  lv_edv_age_gain: float
  lv_edv_range: tuple[float, float]
  lv_ef_mean: float
  lv_ef_sd: float
  lv_ef_range: tuple[float, float]
  dilation_ef: float
  dilation_power: float
  # LV wall thickness at ED (hypertrophy adds a uniform extra in a fraction).
  thickness_female_mm: float
  thickness_male_mm: float
  thickness_sd_mm: float
  thickness_range: tuple[float, float]
  hypertrophy_fraction: float
  hypertrophy_extra_mm: tuple[float, float]
  # RV: EDV = ratio * (LV EDV before dilation) * exp(N(0, log_sd)).
  rv_edv_ratio: float
  rv_edv_log_sd: float
  rv_ef_mean: float
  rv_ef_sd: float
  rv_ef_range: tuple[float, float]
  # Pose. The centre offset is that of the LV+RV bounding box (each axis).
  center_mean_mm: tuple[float, float]
  center_sd_mm: float
  tilt_sd_deg: float          # tilt = |N(0, sd)| (half-normal), azimuth uniform.
  rv_angle_mean_deg: float
  rv_angle_sd_deg: float
  # Appearance.
  intensity_blood: float
  intensity_myocardium: float
  intensity_tissue: float
  intensity_lung: float
  intensity_fat: float
  gain_range: tuple[float, float]   # per-volume global intensity gain.
  texture_amplitude: float          # relative tissue texture amplitude.
  fat_probability: float
  bias_amplitude: float             # bias field is exp(+-bias_amplitude) at most.
  noise_sd: float                   # Rician noise sigma.


DOMAIN_PARAMS: dict[str, DomainParams] = {
    "private": DomainParams(
        name="private",
        age_range=(45.0, 80.0), male_fraction=0.48, bmi_mean=26.5, bmi_sd=3.5,
        lv_edv_female_ml=125.0, lv_edv_male_ml=155.0, lv_edv_log_sd=0.11,
        lv_edv_bmi_gain=0.01, lv_edv_age_gain=0.004,
        lv_edv_range=(80.0, 230.0),
        lv_ef_mean=0.60, lv_ef_sd=0.05, lv_ef_range=(0.42, 0.75),
        dilation_ef=0.0, dilation_power=0.0,
        thickness_female_mm=7.0, thickness_male_mm=8.5, thickness_sd_mm=0.8,
        thickness_range=(5.0, 12.0),
        hypertrophy_fraction=0.0, hypertrophy_extra_mm=(0.0, 0.0),
        rv_edv_ratio=1.08, rv_edv_log_sd=0.08,
        rv_ef_mean=0.57, rv_ef_sd=0.05, rv_ef_range=(0.40, 0.75),
        center_mean_mm=(0.0, 0.0), center_sd_mm=4.0, tilt_sd_deg=5.0,
        rv_angle_mean_deg=160.0, rv_angle_sd_deg=8.0,
        intensity_blood=1.0, intensity_myocardium=0.28, intensity_tissue=0.5,
        intensity_lung=0.08, intensity_fat=0.9, gain_range=(0.95, 1.05),
        texture_amplitude=0.05, fat_probability=0.3, bias_amplitude=0.15,
        noise_sd=0.03),
    "public": DomainParams(
        name="public",
        age_range=(20.0, 85.0), male_fraction=0.6, bmi_mean=26.0, bmi_sd=4.5,
        lv_edv_female_ml=130.0, lv_edv_male_ml=160.0, lv_edv_log_sd=0.15,
        lv_edv_bmi_gain=0.01, lv_edv_age_gain=0.004,
        lv_edv_range=(70.0, 280.0),
        lv_ef_mean=0.50, lv_ef_sd=0.13, lv_ef_range=(0.15, 0.75),
        dilation_ef=0.50, dilation_power=0.5,
        thickness_female_mm=7.5, thickness_male_mm=9.0, thickness_sd_mm=1.2,
        thickness_range=(5.0, 20.0),
        hypertrophy_fraction=0.15, hypertrophy_extra_mm=(3.0, 7.0),
        rv_edv_ratio=1.08, rv_edv_log_sd=0.15,
        rv_ef_mean=0.52, rv_ef_sd=0.10, rv_ef_range=(0.20, 0.75),
        center_mean_mm=(3.0, -3.0), center_sd_mm=8.0, tilt_sd_deg=10.0,
        rv_angle_mean_deg=160.0, rv_angle_sd_deg=15.0,
        intensity_blood=0.85, intensity_myocardium=0.35, intensity_tissue=0.6,
        intensity_lung=0.12, intensity_fat=0.8, gain_range=(0.85, 1.15),
        texture_amplitude=0.08, fat_probability=0.5, bias_amplitude=0.30,
        noise_sd=0.06),
}

# --- Anatomy shared by the domains (documented in the module docstring). ---
_P = 3.0                      # Superellipsoid exponent of LV cavity/outer body.
_ASPECT_RANGE = (2.8, 3.6)    # LV cavity L/R at ED.
_ES_LENGTH_POWER = 0.15       # L_es = L_ed (ESV/EDV)^0.15.
_RV_LENGTH_FRACTION = 0.85    # L_rv = 0.85 L (of the same phase).
_RV_HALF_SPAN = math.radians(105.0)
_RV_WALL_MM = 3.0
_TILT_MAX_DEG = 25.0
_BASE_GAP_SLICES = (0.5, 1.2)  # Base plane below the top edge, in slices.
_FIT_MARGIN_MM = 1.0
_MIN_FOV_MM = 60.0
_LUNG_GAP_MM = (10.0, 20.0)

_ANATOMY = {
    "superellipsoid_p": _P, "aspect_range": _ASPECT_RANGE,
    "es_length_power": _ES_LENGTH_POWER,
    "rv_length_fraction": _RV_LENGTH_FRACTION,
    "rv_half_span_deg": math.degrees(_RV_HALF_SPAN),
    "rv_wall_mm": _RV_WALL_MM, "tilt_max_deg": _TILT_MAX_DEG,
    "base_gap_slices": _BASE_GAP_SLICES, "fit_margin_mm": _FIT_MARGIN_MM,
    "lung_gap_mm": _LUNG_GAP_MM,
}

# Rendered tissue classes (internal; labels map them to 0..3).
_TISSUE, _LV_BLOOD, _LV_MYO, _RV_BLOOD, _RV_WALL, _LUNG, _FAT = range(7)
_N_CLASSES = 7
_CHUNK_SAMPLES = 1 << 18      # Supersamples rendered per chunk (cache-sized).


# ----------------------------------------------------------------------------
# Closed-form shape constants.
# ----------------------------------------------------------------------------


@functools.cache
def _shape_constants() -> tuple[float, float, float, float]:
  """Returns (c_p, centroid fraction, G1, G2), computed once.

  c_p: volume factor pi R^2 L c_p of the superellipsoid of revolution.
  centroid fraction: the cavity centroid is at u = fraction * L.
  G1, G2: integrals over phi of the RV angular profile g and g^2.
  """
  p = _P
  c_p = integrate.quad(lambda t: (1.0 - t**p) ** (2.0 / p), 0.0, 1.0)[0]
  m1 = integrate.quad(lambda t: t * (1.0 - t**p) ** (2.0 / p), 0.0, 1.0)[0]
  cos_span = math.cos(_RV_HALF_SPAN)
  g1 = 2.0 * integrate.quad(
      lambda f: math.sqrt(max(0.0, (math.cos(f) - cos_span) / (1 - cos_span))),
      0.0, _RV_HALF_SPAN, limit=200)[0]
  g2 = 2.0 * (math.sin(_RV_HALF_SPAN) - _RV_HALF_SPAN * cos_span) / (1 - cos_span)
  return c_p, m1 / c_p, g1, g2


@functools.cache
def _gauss_legendre(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
  """Nodes/weights on [0, pi/2] for the RV u-integrals (smooth after u = L sin t)."""
  x, w = np.polynomial.legendre.leggauss(n)
  return (x + 1.0) * math.pi / 4.0, w * math.pi / 4.0


def _superellipsoid_radius(u: np.ndarray, radius: float, length: float) -> np.ndarray:
  """r(u) = radius (1 - (u/length)^p)^(1/p), zero outside 0..length."""
  t = np.clip(np.asarray(u, np.float64) / length, 0.0, 1.0)
  return radius * np.cbrt(1.0 - t**3) if _P == 3.0 else radius * (1.0 - t**_P) ** (1 / _P)


def _lv_volume_mm3(r: float, length: float) -> float:
  return math.pi * _shape_constants()[0] * r * r * length


def _myo_volume_mm3(r: float, length: float, t: float) -> float:
  return _lv_volume_mm3(r + t, length + t) - _lv_volume_mm3(r, length)


# ----------------------------------------------------------------------------
# Anatomy: per-subject draws and the solved geometry.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Subject:
  """Shape-independent draws of one subject (the anatomy stream)."""
  age: float
  sex: int
  bmi: float
  lv_edv: float     # mL
  lv_ef: float
  t_ed: float       # mm
  aspect: float
  rv_edv: float     # mL
  rv_ef: float


@dataclasses.dataclass(frozen=True)
class _Heart:
  """Solved geometry of one phase, in mm (heart frame)."""
  r: float          # LV cavity radius R.
  length: float     # LV cavity length L.
  t: float          # wall thickness T.
  rv_scale: float   # RV crescent size s (max thickness at the base), mm.
  rv_length: float  # L_rv.

  @property
  def r_out(self) -> float:
    return self.r + self.t

  @property
  def l_out(self) -> float:
    return self.length + self.t

  @property
  def lv_ml(self) -> float:
    return _lv_volume_mm3(self.r, self.length) / 1e3

  @property
  def myo_ml(self) -> float:
    return _myo_volume_mm3(self.r, self.length, self.t) / 1e3

  @property
  def rv_ml(self) -> float:
    a, b = _rv_volume_coefficients(self.r_out, self.l_out, self.rv_length)
    return (self.rv_scale * a + self.rv_scale**2 * b) / 1e3


def _draw_subject(rng: np.random.Generator, dp: DomainParams) -> _Subject:
  """Draws demographics and cardiac function with plausible correlations.

  Men have larger volumes and thicker walls; EDV grows a little with BMI and
  falls a little with age; in the public domain a low EF dilates the LV and a
  fraction of subjects is hypertrophic.
  """
  sex = int(rng.random() < dp.male_fraction)
  age = float(rng.uniform(*dp.age_range))
  bmi = float(np.clip(rng.normal(dp.bmi_mean, dp.bmi_sd), 17.0, 45.0))
  ef = float(np.clip(rng.normal(dp.lv_ef_mean, dp.lv_ef_sd), *dp.lv_ef_range))
  base = dp.lv_edv_male_ml if sex else dp.lv_edv_female_ml
  edv0 = (base * (1.0 + dp.lv_edv_bmi_gain * (bmi - 26.0))
          * (1.0 - dp.lv_edv_age_gain * (age - 60.0))
          * math.exp(rng.normal(0.0, dp.lv_edv_log_sd)))
  dilation = 1.0
  if ef < dp.dilation_ef:
    dilation = (dp.dilation_ef / ef) ** dp.dilation_power
  edv = float(np.clip(edv0 * dilation, *dp.lv_edv_range))
  t_mean = dp.thickness_male_mm if sex else dp.thickness_female_mm
  t_ed = rng.normal(t_mean, dp.thickness_sd_mm) + 0.05 * (bmi - 26.0)
  hypertrophic = rng.random() < dp.hypertrophy_fraction
  extra = rng.uniform(*dp.hypertrophy_extra_mm)
  t_ed = float(np.clip(t_ed + (extra if hypertrophic else 0.0), *dp.thickness_range))
  aspect = float(rng.uniform(*_ASPECT_RANGE))
  rv_edv = float(dp.rv_edv_ratio * np.clip(edv0, *dp.lv_edv_range)
                 * math.exp(rng.normal(0.0, dp.rv_edv_log_sd)))
  rv_ef = float(np.clip(rng.normal(dp.rv_ef_mean, dp.rv_ef_sd), *dp.rv_ef_range))
  return _Subject(age=age, sex=sex, bmi=bmi, lv_edv=edv, lv_ef=ef, t_ed=t_ed,
                  aspect=aspect, rv_edv=rv_edv, rv_ef=rv_ef)


def _rv_volume_coefficients(r_out: float, l_out: float, rv_length: float
                            ) -> tuple[float, float]:
  """Returns (A, B) with RV volume(s) = s A + s^2 B in mm^3.

  Cross-section area at u is s h(u) r_o(u) G1 + s^2 h(u)^2 G2 / 2. With
  u = L_rv sin(t), h = cos(t) and both integrands become smooth, so a fixed
  Gauss-Legendre rule is exact to round-off.
  """
  _, _, g1, g2 = _shape_constants()
  t, w = _gauss_legendre()
  u = rv_length * np.sin(t)
  cos_t = np.cos(t)
  a = g1 * rv_length * float(np.sum(w * _superellipsoid_radius(u, r_out, l_out) * cos_t**2))
  b = 0.5 * g2 * rv_length * 2.0 / 3.0   # int_0^L h^2 du = 2 L / 3.
  return a, b


def _solve_rv_scale(volume_ml: float, r_out: float, l_out: float, rv_length: float) -> float:
  """Closed-form root of s A + s^2 B = volume."""
  a, b = _rv_volume_coefficients(r_out, l_out, rv_length)
  v = volume_ml * 1e3
  return (2.0 * v) / (a + math.sqrt(a * a + 4.0 * b * v))


def _solve_es_thickness(r_es: float, l_es: float, myo_mm3: float, t_ed: float) -> float:
  """T at ES conserving the myocardial volume (root is > T_ed when ESV < EDV)."""
  f = lambda t: _myo_volume_mm3(r_es, l_es, t) - myo_mm3
  hi = 2.0 * t_ed + 10.0
  while f(hi) < 0.0:
    hi *= 2.0
  return optimize.brentq(f, 0.0, hi, xtol=1e-10, rtol=1e-12)


def _solve_phases(edv_ml: float, esv_ml: float, length_ed: float, t_ed: float,
                  rv_edv_ml: float, rv_esv_ml: float) -> tuple[_Heart, _Heart]:
  """Both phases' geometry from the volumes, the ED length and the ED thickness."""
  c_p = _shape_constants()[0]
  r_ed = math.sqrt(edv_ml * 1e3 / (math.pi * c_p * length_ed))
  length_es = length_ed * (esv_ml / edv_ml) ** _ES_LENGTH_POWER
  r_es = math.sqrt(esv_ml * 1e3 / (math.pi * c_p * length_es))
  t_es = _solve_es_thickness(r_es, length_es, _myo_volume_mm3(r_ed, length_ed, t_ed), t_ed)
  hearts = []
  for r, length, t, rv_ml in ((r_ed, length_ed, t_ed, rv_edv_ml),
                              (r_es, length_es, t_es, rv_esv_ml)):
    rv_length = _RV_LENGTH_FRACTION * length
    s = _solve_rv_scale(rv_ml, r + t, length + t, rv_length)
    hearts.append(_Heart(r=r, length=length, t=t, rv_scale=s, rv_length=rv_length))
  return hearts[0], hearts[1]


# ----------------------------------------------------------------------------
# Pose, placement and appearance (the layout stream).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Shape-independent random draws for pose and appearance."""
  tilt_deg: float
  tilt_azimuth: float        # rad
  rv_angle: float            # rad
  offset_yx: tuple[float, float]
  base_gap: float            # in slices
  phase_es: bool             # the coin used when phase="random"
  fat: tuple[float, float, float, float] | None  # thick mm, half-span rad, u0/L, u1/L
  lungs: tuple[tuple[float, ...], ...]   # (angle, gap, a_rad, a_tan, a_z, z_off) each
  gain: float
  texture: np.ndarray        # (K, 5): wavelength, unit direction (3), phase
  bias: np.ndarray           # (9,) quadratic polynomial coefficients


def _draw_layout(rng: np.random.Generator, dp: DomainParams) -> _Layout:
  """Draws pose and appearance; a fixed number of draws, so streams stay aligned."""
  tilt = min(abs(float(rng.normal(0.0, dp.tilt_sd_deg))), _TILT_MAX_DEG)
  azimuth = float(rng.uniform(0.0, 2.0 * math.pi))
  rv_angle = math.radians(rng.normal(dp.rv_angle_mean_deg, dp.rv_angle_sd_deg))
  offset = rng.normal(dp.center_mean_mm, dp.center_sd_mm, size=2)
  base_gap = float(rng.uniform(*_BASE_GAP_SLICES))
  phase_es = bool(rng.random() < 0.5)
  fat_draw = rng.uniform(size=5)
  fat = None
  if fat_draw[0] < dp.fat_probability:
    fat = (2.0 + 1.5 * fat_draw[1], math.radians(20.0 + 15.0 * fat_draw[2]),
           0.1 + 0.1 * fat_draw[3], 0.5 + 0.15 * fat_draw[4])
  lungs = []
  for side in (-1.0, 1.0):
    d = rng.uniform(size=6)
    lungs.append((rv_angle + math.pi + side * math.radians(60.0 + 25.0 * d[0]),
                  _LUNG_GAP_MM[0] + (_LUNG_GAP_MM[1] - _LUNG_GAP_MM[0]) * d[1],
                  40.0 + 15.0 * d[2], 55.0 + 20.0 * d[3], 120.0 + 80.0 * d[4],
                  40.0 * (d[5] - 0.5)))
  gain = float(rng.uniform(*dp.gain_range))
  k = 4
  direction = rng.normal(size=(k, 3))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  texture = np.column_stack([rng.uniform(25.0, 70.0, k), direction,
                             rng.uniform(0.0, 2 * math.pi, k)])
  bias = rng.normal(size=9)
  return _Layout(tilt_deg=tilt, tilt_azimuth=azimuth, rv_angle=rv_angle,
                 offset_yx=(float(offset[0]), float(offset[1])), base_gap=base_gap,
                 phase_es=phase_es, fat=fat, lungs=tuple(lungs), gain=gain,
                 texture=texture, bias=bias)


def _heart_frame(tilt_deg: float, azimuth: float) -> np.ndarray:
  """Rows (a, e1, e2) in (z, y, x) world components: axis and cross-section basis."""
  th = math.radians(tilt_deg)
  a = np.array([math.cos(th), math.sin(th) * math.sin(azimuth),
                math.sin(th) * math.cos(azimuth)])
  e1 = np.array([0.0, 0.0, 1.0]) - a[2] * a
  e1 /= np.linalg.norm(e1)
  e2 = np.array([0.0, 1.0, 0.0]) - a[1] * a - e1[1] * e1
  e2 /= np.linalg.norm(e2)
  return np.stack([a, e1, e2])


def _outer_surface(heart: _Heart, rv_angle: float, fat_mm: float) -> np.ndarray:
  """Points (N, 3) in heart (u, v, w) on the outer surface of LV+RV (+ fat)."""
  u = np.linspace(0.0, heart.l_out, 64)
  phi = np.linspace(0.0, 2 * math.pi, 144, endpoint=False)
  r_o = _superellipsoid_radius(u, heart.r_out, heart.l_out)[:, None]
  h = heart.rv_scale * np.sqrt(np.clip(1.0 - (u / heart.rv_length) ** 2, 0.0, None))[:, None]
  cos_rel = np.cos(phi - rv_angle)[None, :]
  g = _rv_profile(cos_rel)
  in_wall = (cos_rel > _wall_cos(heart)) & (u[:, None] <= heart.rv_length + _RV_WALL_MM)
  radius = r_o + np.where(in_wall, h * g + _RV_WALL_MM, fat_mm)
  uu = np.broadcast_to(u[:, None], radius.shape)
  return np.stack([uu.ravel(), (radius * np.cos(phi)).ravel(),
                   (radius * np.sin(phi)).ravel()], axis=1)


def _rv_profile(cos_rel: np.ndarray) -> np.ndarray:
  """Angular RV thickness profile g in 0..1 (zero beyond the half-span)."""
  c = math.cos(_RV_HALF_SPAN)
  return np.sqrt(np.clip((cos_rel - c) / (1.0 - c), 0.0, None))


def _wall_cos(heart: _Heart) -> float:
  """cos of the half-span of the RV free wall (a little wider than the cavity)."""
  return math.cos(min(math.pi, _RV_HALF_SPAN + _RV_WALL_MM / heart.r_out))


@dataclasses.dataclass(frozen=True)
class _Placed:
  """Everything needed to render one volume, in world mm."""
  heart: _Heart
  frame: np.ndarray         # rows a, e1, e2
  origin: np.ndarray        # world (z, y, x) of the base-plane centre
  rv_angle: float
  center_yx: tuple[float, float]
  fat: tuple[float, float, float, float] | None
  lungs: tuple[tuple[float, ...], ...]  # (cz, cy, cx, dir_y, dir_x, a_rad, a_tan, a_z)


def _extents(hearts: Sequence[_Heart], frame: np.ndarray, rv_angle: float,
             fat_mm: float) -> tuple[np.ndarray, np.ndarray]:
  """World (z, y, x) min and max of the union of hearts, relative to the origin."""
  pts = np.concatenate([_outer_surface(h, rv_angle, fat_mm) for h in hearts])
  world = pts @ frame
  return world.min(axis=0), world.max(axis=0)


def _fit_subject(sub: _Subject, lay: _Layout, fov: np.ndarray, frame: np.ndarray
                 ) -> tuple[_Heart, _Heart]:
  """Solves the (ED, ES) hearts, shortened and/or scaled until both fit the FOV.

  First L is shortened at constant EDV (down to the smallest aspect) until the
  through-plane extent fits; if the heart is still too large along any axis
  it is scaled uniformly (volumes by k^3, lengths by k), which keeps its shape.
  """
  esv = sub.lv_edv * (1.0 - sub.lv_ef)
  rv_esv = sub.rv_edv * (1.0 - sub.rv_ef)
  fat_mm = lay.fat[0] if lay.fat else 0.0
  avail = fov - 2.0 * _FIT_MARGIN_MM
  c_p = _shape_constants()[0]

  def solve(length: float, k: float = 1.0) -> tuple[_Heart, _Heart]:
    return _solve_phases(sub.lv_edv * k**3, esv * k**3, length * k, sub.t_ed * k,
                         sub.rv_edv * k**3, rv_esv * k**3)

  def size(hearts) -> np.ndarray:
    lo, hi = _extents(hearts, frame, lay.rv_angle, fat_mm)
    return hi - lo

  length_of_aspect = lambda asp: (asp * asp * sub.lv_edv * 1e3 / (math.pi * c_p)) ** (1 / 3)
  length = length_of_aspect(sub.aspect)
  hearts = solve(length)
  if size(hearts)[0] > avail[0]:
    short = length_of_aspect(_ASPECT_RANGE[0])
    if size(solve(short))[0] <= avail[0]:
      length = optimize.brentq(lambda l: size(solve(l))[0] - avail[0], short, length,
                               xtol=1e-3)
    else:
      length = short
    hearts = solve(length)
  k = float(np.min(avail / size(hearts)))
  if k < 1.0:
    hearts = solve(length, 0.999 * k)
  return hearts


def _place(sub: _Subject, lay: _Layout, shape: tuple[int, int, int],
           spacing: np.ndarray, es: bool) -> tuple[_Placed, _Heart, _Heart]:
  """Fits and positions the heart; returns (rendered phase placed, ED heart, ES heart).

  Placement uses the union of both phases, so a subject's ED and ES volumes
  share the base plane and pose.
  """
  fov = np.asarray(shape, np.float64) * spacing
  frame = _heart_frame(lay.tilt_deg, lay.tilt_azimuth)
  ed, es_heart = _fit_subject(sub, lay, fov, frame)
  fat_mm = lay.fat[0] if lay.fat else 0.0
  lo, hi = _extents((ed, es_heart), frame, lay.rv_angle, fat_mm)
  half = fov / 2.0 - _FIT_MARGIN_MM
  # Through-plane: base plane centre base_gap slices below the top edge.
  z = -fov[0] / 2.0 + lay.base_gap * spacing[0]
  z = _clamp(z, -half[0] - lo[0], half[0] - hi[0])
  # In-plane: bounding-box centre at the drawn offset, kept inside.
  yx = []
  for ax, off in ((1, lay.offset_yx[0]), (2, lay.offset_yx[1])):
    yx.append(_clamp(off - 0.5 * (lo[ax] + hi[ax]), -half[ax] - lo[ax], half[ax] - hi[ax]))
  origin = np.array([z, yx[0], yx[1]])
  heart = es_heart if es else ed
  centroid = origin + _shape_constants()[1] * heart.length * frame[0]
  placed = _Placed(heart=heart, frame=frame, origin=origin, rv_angle=lay.rv_angle,
                   center_yx=(float(centroid[1]), float(centroid[2])), fat=lay.fat,
                   lungs=_place_lungs(lay, ed, origin, frame))
  return placed, ed, es_heart


def _place_lungs(lay: _Layout, ed: _Heart, origin: np.ndarray, frame: np.ndarray
                 ) -> tuple[tuple[float, ...], ...]:
  """Lung ellipsoids beside the ED heart (same for both phases), >= gap from it."""
  mid = origin + 0.5 * ed.length * frame[0]
  lungs = []
  for angle, gap, a_rad, a_tan, a_z, z_off in lay.lungs:
    dir_y, dir_x = math.sin(angle), math.cos(angle)
    dist = ed.r_out + gap + a_rad
    lungs.append((mid[0] + z_off, mid[1] + dist * dir_y, mid[2] + dist * dir_x,
                  dir_y, dir_x, a_rad, a_tan, a_z))
  return tuple(lungs)


def _clamp(x: float, lo: float, hi: float) -> float:
  """Clamps x to [lo, hi]; the midpoint if the interval is empty (cannot happen after fit)."""
  if lo > hi:
    return 0.5 * (lo + hi)
  return min(max(x, lo), hi)


# ----------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------


def _supersampling(spacing: np.ndarray) -> tuple[int, int, int]:
  """Samples per voxel and axis: ~2 mm through-plane, <= 0.9 mm in-plane, >= 2."""
  steps = (2.0, 0.9, 0.9)
  return tuple(max(2, math.ceil(s / st - 1e-9)) for s, st in zip(spacing, steps))


def _voxel_axes(shape: Sequence[int], spacing: np.ndarray) -> list[np.ndarray]:
  """World coordinates of the voxel centres along each axis."""
  return [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]


def _sub_offsets(spacing: np.ndarray) -> np.ndarray:
  """(n_sub, 3) offsets of the supersamples from their voxel centre, in mm.

  A regular in-plane grid; through-plane, each in-plane sample takes its own
  sub-stratum of the nz strata (an N-rooks pattern), so a boundary parallel
  to the slices (the base plane of an untilted heart) is resolved at
  dz / (nz ny nx) instead of dz / nz, at no extra cost.
  """
  nz, ny, nx = _supersampling(spacing)
  iz, iy, ix = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
  stratum = (iy * nx + ix + 0.5) / (ny * nx)
  z = ((iz + stratum) / nz - 0.5) * spacing[0]
  y = ((iy + 0.5) / ny - 0.5) * spacing[1]
  x = ((ix + 0.5) / nx - 0.5) * spacing[2]
  return np.stack([z.ravel(), y.ravel(), x.ravel()], axis=1)


def _affine_features(pl: _Placed) -> tuple[np.ndarray, np.ndarray]:
  """(M, b) such that M @ (z, y, x) + b gives every coordinate the classifier needs.

  Rows: heart frame (u, v, w), then per lung its (radial, tangential, z)
  coordinates scaled by the semi-axes. All are affine in the world point, so
  a supersample's features are its voxel centre's plus a fixed per-offset
  term: two small matrix products instead of per-sample trigonometry.
  """
  rows = [pl.frame[0], pl.frame[1], pl.frame[2]]
  bias = [-float(r @ pl.origin) for r in rows]
  for cz, cy, cx, dir_y, dir_x, a_rad, a_tan, a_z in pl.lungs:
    centre = np.array([cz, cy, cx])
    for r in (np.array([0.0, dir_y, dir_x]) / a_rad, np.array([0.0, -dir_x, dir_y]) / a_tan,
              np.array([1.0, 0.0, 0.0]) / a_z):
      rows.append(r)
      bias.append(-float(r @ centre))
  return np.stack(rows), np.array(bias)


def _classify(pl: _Placed, feats: Sequence[np.ndarray]) -> np.ndarray:
  """Class code (uint8) of points given by broadcastable float32 features.

  `feats` are the rows of `_affine_features` evaluated at the points. Later
  assignments win: lungs < fat < RV wall < RV blood < LV myocardium < LV blood.
  """
  f32 = np.float32
  h = pl.heart
  u, v, w = feats[:3]
  rho = np.sqrt(v * v + w * w)
  rho3 = rho * rho * rho
  below_base = u >= 0.0
  t3 = u * f32(1.0 / h.l_out)
  t3 = t3 * t3 * t3
  outer = (rho3 < f32(h.r_out**3) * (f32(1.0) - t3)) & below_base
  t3c = u * f32(1.0 / h.length)
  t3c = t3c * t3c * t3c
  cavity = (rho3 < f32(h.r**3) * (f32(1.0) - t3c)) & below_base
  r_o = f32(h.r_out) * np.cbrt(np.maximum(f32(1.0) - t3, f32(0.0)))
  d = rho - r_o                        # radial distance outside the LV outer body
  cos_rel = ((v * f32(math.cos(pl.rv_angle)) + w * f32(math.sin(pl.rv_angle)))
             / np.maximum(rho, f32(1e-6)))
  un = u * f32(1.0 / h.rv_length)
  hu = f32(h.rv_scale) * np.sqrt(np.maximum(f32(1.0) - un * un, f32(0.0)))
  thick = hu * _rv_profile(cos_rel)
  outside = (d >= 0.0) & below_base
  rv_blood = outside & (d < thick)
  rv_wall = (outside & (d < thick + f32(_RV_WALL_MM)) & (cos_rel > f32(_wall_cos(h)))
             & (u <= f32(h.rv_length + _RV_WALL_MM)))
  codes = np.zeros(u.shape, np.uint8)
  for i in range(3, len(feats), 3):
    r, t, q = feats[i:i + 3]
    codes[(r * r + t * t) + q * q < 1.0] = _LUNG
  if pl.fat is not None:
    thick_fat, span, u0, u1 = pl.fat
    fat = (outside & (d < f32(thick_fat)) & (cos_rel < f32(-math.cos(span)))
           & (u >= f32(u0 * h.length)) & (u <= f32(u1 * h.length)))
    codes[fat] = _FAT
  codes[rv_wall] = _RV_WALL
  codes[rv_blood] = _RV_BLOOD
  codes[outer] = _LV_MYO
  codes[cavity] = _LV_BLOOD
  return codes


def _render_fractions(pl: _Placed, shape: tuple[int, int, int], spacing: np.ndarray,
                      supersample_all: bool = False) -> np.ndarray:
  """Class fractions (N_CLASSES, D, H, W) float32 by supersampled partial volume.

  Voxel centres (plus a one-voxel ring outside the FOV) are classified first;
  only voxels whose neighbourhood (+-1 slice, +-2 voxels in-plane) holds more
  than one class are supersampled. Every structure is continuous and at
  least ~3 mm thick, so each voxel a boundary crosses is caught (the tests
  compare with `supersample_all=True`); it is ~3x faster than supersampling
  every voxel.
  """
  m, b = _affine_features(pl)
  axes = _voxel_axes([n + 2 for n in shape], spacing)      # padded by one voxel
  centre = _classify_grid(pl, m, b, axes)
  boundary = (ndimage.maximum_filter(centre, size=(3, 5, 5), mode="nearest")
              != ndimage.minimum_filter(centre, size=(3, 5, 5), mode="nearest"))
  centre, boundary = centre[1:-1, 1:-1, 1:-1], boundary[1:-1, 1:-1, 1:-1]
  if supersample_all:   # Reference path for tests.
    boundary[...] = True
  fractions = np.zeros((_N_CLASSES, centre.size), np.float32)
  fractions[centre.ravel(), np.arange(centre.size)] = 1.0
  idx = np.flatnonzero(boundary)
  offset_feats = (_sub_offsets(spacing) @ m.T).astype(np.float32)         # (n_sub, F)
  n_sub = len(offset_feats)
  per_chunk = max(1, _CHUNK_SAMPLES // n_sub)
  axes = _voxel_axes(shape, spacing)
  for start in range(0, idx.size, per_chunk):
    chunk = idx[start:start + per_chunk]
    points = np.stack([a[i] for a, i in zip(axes, np.unravel_index(chunk, shape))], axis=1)
    centre_feats = (points @ m.T + b).astype(np.float32)                   # (n, F)
    codes = _classify(pl, [centre_feats[:, f, None] + offset_feats[None, :, f]
                           for f in range(len(m))])
    n = len(chunk)
    counts = np.bincount((np.arange(n)[:, None] * _N_CLASSES + codes).ravel(),
                         minlength=n * _N_CLASSES).reshape(n, _N_CLASSES)
    fractions[:, chunk] = counts.T * np.float32(1.0 / n_sub)
  return fractions.reshape((_N_CLASSES,) + tuple(shape))


def _classify_grid(pl: _Placed, m: np.ndarray, b: np.ndarray,
                   axes: Sequence[np.ndarray]) -> np.ndarray:
  """Class codes at the grid points axes[0] x axes[1] x axes[2], in slabs."""
  z, y, x = axes
  out = np.empty((len(z), len(y), len(x)), np.uint8)
  step = max(1, _CHUNK_SAMPLES // (len(y) * len(x)))
  for s in range(0, len(z), step):
    zs = z[s:s + step]
    feats = [((m[f, 0] * zs + b[f])[:, None, None] + (m[f, 1] * y)[None, :, None])
             .astype(np.float32) + (m[f, 2] * x).astype(np.float32)[None, None, :]
             for f in range(len(m))]
    out[s:s + step] = _classify(pl, feats)
  return out


def _class_intensities(gain: float, dp: DomainParams) -> np.ndarray:
  """Per-class intensity lookup table (float32, indexed by class code)."""
  lut = np.zeros(_N_CLASSES, np.float32)
  lut[_TISSUE] = dp.intensity_tissue
  lut[_LV_BLOOD] = lut[_RV_BLOOD] = dp.intensity_blood
  lut[_LV_MYO] = lut[_RV_WALL] = dp.intensity_myocardium
  lut[_LUNG] = dp.intensity_lung
  lut[_FAT] = dp.intensity_fat
  return lut * np.float32(gain)


def _labels(fractions: np.ndarray) -> np.ndarray:
  """uint8 argmax of background / LV blood / LV myocardium / RV blood fractions."""
  label_fractions = np.stack([
      1.0 - fractions[_LV_BLOOD] - fractions[_LV_MYO] - fractions[_RV_BLOOD],
      fractions[_LV_BLOOD], fractions[_LV_MYO], fractions[_RV_BLOOD]])
  return np.argmax(label_fractions, axis=0).astype(np.uint8)


def _voxel_grid(shape: Sequence[int], spacing: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Voxel-centre world coordinates, broadcastable as (D,1,1), (1,H,1), (1,1,W)."""
  z, y, x = _voxel_axes(shape, spacing)
  return z[:, None, None], y[None, :, None], x[None, None, :]


def _texture(lay: _Layout, grid, amplitude: float) -> np.ndarray:
  """Smooth relative tissue texture: a few random plane waves (25..70 mm)."""
  z, y, x = grid
  tex = 0.0
  for wavelength, dz, dy, dx, phase in lay.texture:
    k = 2.0 * math.pi / wavelength
    tex = tex + np.cos(k * (dz * z + dy * y + dx * x) + phase)
  return (amplitude / math.sqrt(len(lay.texture)) * tex).astype(np.float32)


def _bias_field(lay: _Layout, grid, fov: np.ndarray, amplitude: float) -> np.ndarray:
  """exp(amplitude f) with f a random quadratic in FOV-normalised coordinates, max|f| = 1."""
  z, y, x = (g / (f / 2.0) for g, f in zip(grid, fov))
  terms = (z, y, x, z * z - 1 / 3, y * y - 1 / 3, x * x - 1 / 3, z * y, z * x, y * x)
  f = sum(c * t for c, t in zip(lay.bias, terms))
  f = np.broadcast_to(f, np.broadcast_shapes(z.shape, y.shape, x.shape))
  peak = float(np.max(np.abs(f)))
  return np.exp(amplitude * f / max(peak, 1e-12)).astype(np.float32)


def _rician(image: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
  """Magnitude of a complex signal with Gaussian noise on both channels."""
  n = rng.normal(0.0, sd, size=(2,) + image.shape).astype(np.float32)
  return np.sqrt((image + n[0]) ** 2 + n[1] ** 2)


# ----------------------------------------------------------------------------
# One subject, and the public generator.
# ----------------------------------------------------------------------------


def _subject_streams(seed: int, domain: str, index: int) -> list[np.random.Generator]:
  """Independent anatomy / layout / noise generators of subject `index`."""
  ss = np.random.SeedSequence([seed, DOMAINS.index(domain), index])
  return [np.random.default_rng(s) for s in ss.spawn(3)]


def _make_subject(seed: int, domain: str, index: int, shape: tuple[int, int, int],
                  spacing: np.ndarray, phase: str, with_labels: bool
                  ) -> tuple[np.ndarray, dict[str, float], np.ndarray | None]:
  """Renders subject `index`: (volume, attribute row, labels or None)."""
  dp = DOMAIN_PARAMS[domain]
  rng_anatomy, rng_layout, rng_noise = _subject_streams(seed, domain, index)
  sub = _draw_subject(rng_anatomy, dp)
  lay = _draw_layout(rng_layout, dp)
  es = lay.phase_es if phase == "random" else phase == "es"
  pl, ed_heart, es_heart = _place(sub, lay, shape, spacing, es)
  lut = _class_intensities(lay.gain, dp)
  fractions = _render_fractions(pl, shape, spacing)
  grid = _voxel_grid(shape, spacing)
  fov = np.asarray(shape, np.float64) * spacing
  image = np.zeros(shape, np.float32)
  for k in range(_N_CLASSES):   # A fixed summation order (no BLAS): reproducible.
    image += lut[k] * fractions[k]
  image += fractions[_TISSUE] * lut[_TISSUE] * _texture(lay, grid, dp.texture_amplitude)
  image *= _bias_field(lay, grid, fov, dp.bias_amplitude)
  volume = _rician(image, dp.noise_sd, rng_noise)
  labels = _labels(fractions) if with_labels else None
  row = _attribute_row(sub, lay, pl, ed_heart, es_heart, es)
  return volume, row, labels


def _attribute_row(sub: _Subject, lay: _Layout, pl: _Placed, ed: _Heart, es: _Heart,
                   is_es: bool) -> dict[str, float]:
  """The ATTRIBUTES of one rendered volume, recomputed from the final geometry."""
  heart = es if is_es else ed
  row = {
      "lv_edv_ml": ed.lv_ml, "lv_esv_ml": es.lv_ml,
      "lv_ef": (ed.lv_ml - es.lv_ml) / ed.lv_ml,
      "rv_edv_ml": ed.rv_ml, "rv_esv_ml": es.rv_ml,
      "rv_ef": (ed.rv_ml - es.rv_ml) / ed.rv_ml,
      "myo_thickness_ed_mm": ed.t, "myo_thickness_es_mm": es.t,
      "age": sub.age, "sex": float(sub.sex), "bmi": sub.bmi,
      "phase": float(is_es), "lv_volume_ml": heart.lv_ml, "rv_volume_ml": heart.rv_ml,
      "myo_thickness_mm": heart.t, "myo_volume_ml": heart.myo_ml,
      "tilt_deg": lay.tilt_deg,
      "rv_angle_deg": math.degrees(lay.rv_angle) % 360.0,
      "center_y_mm": pl.center_yx[0], "center_x_mm": pl.center_yx[1],
  }
  return {k: float(row[k]) for k in ATTRIBUTES}


def _check_args(n: int, domain: str, shape: Sequence[int], spacing: Sequence[float],
                seed: int, phase: str) -> tuple[tuple[int, int, int], np.ndarray]:
  """Validates user arguments (DataError), returning (shape, spacing) normalised."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise DataError(f"n must be a positive integer, got {n!r}")
  if domain not in DOMAINS:
    raise DataError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
  if phase not in PHASES:
    raise DataError(f"unknown phase {phase!r}; expected one of {PHASES}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"seed must be a non-negative integer, got {seed!r}")
  try:
    shp = tuple(int(s) for s in shape)
    ok = len(shp) == 3 and all(s >= 1 and s == t for s, t in zip(shp, shape))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise DataError(f"shape must be 3 positive integers (D, H, W), got {shape!r}")
  sp = _check_spacing(spacing)
  fov = np.asarray(shp) * sp
  if np.any(fov < _MIN_FOV_MM):
    raise DataError(
        f"field of view {' x '.join(f'{f:g}' for f in fov)} mm (shape x spacing) is too "
        f"small for a heart; every axis needs >= {_MIN_FOV_MM:g} mm (default 120 x 115.2 x "
        f"115.2)")
  return shp, sp


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
  """Spacing as a float64 (3,) array of positive finite mm, else DataError."""
  try:
    sp = np.asarray(spacing, np.float64)
  except (TypeError, ValueError):
    sp = np.zeros(0)
  if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
    raise DataError(f"spacing must be 3 positive finite numbers (dz, dy, dx) in mm, "
                    f"got {spacing!r}")
  return sp


def _iter_subjects(n: int, domain: str, shape, spacing, seed: int, phase: str,
                   with_labels: bool, progress: bool, what: str
                   ) -> Iterator[tuple[int, np.ndarray, dict[str, float], np.ndarray | None]]:
  """Yields (i, volume, row, labels) for i in range(n), with an optional progress bar."""
  if not progress:
    for i in range(n):
      yield (i, *_make_subject(seed, domain, i, shape, spacing, phase, with_labels))
    return
  from rich.progress import Progress  # Lazy: only needed for interactive use.
  with Progress(transient=True) as bar:
    task = bar.add_task(what, total=n)
    for i in range(n):
      yield (i, *_make_subject(seed, domain, i, shape, spacing, phase, with_labels))
      bar.advance(task)


def generate(n: int, *, domain: str = "private",
             shape: Sequence[int] = (12, 64, 64),
             spacing: Sequence[float] = (10.0, 1.8, 1.8), seed: int = 0,
             phase: str = "random", return_labels: bool = False,
             progress: bool = False
             ) -> (tuple[np.ndarray, dict[str, np.ndarray]]
                   | tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]):
  """Renders n phantoms of a domain with their ground-truth attributes.

  Args:
    n: number of volumes (one per subject; subject i is the same whatever n).
    domain: "private" (UK-Biobank-like) or "public" (ACDC/M&Ms-like).
    shape: (D, H, W) voxels; D is the slice axis.
    spacing: (dz, dy, dx) in mm.
    seed: non-negative integer; same arguments -> bitwise identical outputs.
    phase: "random" (ED or ES, 50/50 per subject), "ed" or "es".
    return_labels: also return uint8 labels (0 background, 1 LV blood pool,
      2 LV myocardium, 3 RV blood pool), the argmax of the class fractions.
    progress: show a rich progress bar.

  Returns:
    (volumes float32 (n, D, H, W), attributes {name: float64 (n,)} in
    ATTRIBUTES order) and, if return_labels, labels uint8 (n, D, H, W).

  Raises:
    DataError: bad n, domain, phase, seed, shape or spacing.
  """
  shp, sp = _check_args(n, domain, shape, spacing, seed, phase)
  volumes = np.empty((n,) + shp, np.float32)
  labels = np.empty((n,) + shp, np.uint8) if return_labels else None
  table = {k: np.empty(n, np.float64) for k in ATTRIBUTES}
  for i, vol, row, lab in _iter_subjects(n, domain, shp, sp, int(seed), phase,
                                         return_labels, progress, f"phantoms ({domain})"):
    volumes[i] = vol
    for k, v in row.items():
      table[k][i] = v
    if labels is not None:
      labels[i] = lab
  if labels is not None:
    return volumes, table, labels
  return volumes, table



# ----------------------------------------------------------------------------
# Writing a dataset to disk.
# ----------------------------------------------------------------------------

_DTYPES = ("int16", "float32")


def subject_id(domain: str, index: int) -> str:
  """File stem of subject `index` (0-based): e.g. "private-00001" for index 0."""
  return f"{domain}-{index + 1:05d}"


def write_dataset(out_dir: str | os.PathLike, n: int, *, domain: str = "private",
                  shape: Sequence[int] = (12, 64, 64),
                  spacing: Sequence[float] = (10.0, 1.8, 1.8), seed: int = 0,
                  phase: str = "random", dtype: str = "int16", labels: bool = True,
                  overwrite: bool = False, progress: bool = True) -> pathlib.Path:
  """Writes n phantoms as NIfTI files plus their attribute table, atomically.

  Layout: out_dir/<subject_id>.nii.gz, out_dir/labels/<subject_id>.nii.gz
  (uint8, if `labels`), out_dir/attributes.csv (`subject_id` then
  ATTRIBUTES) and out_dir/phantoms.json (arguments, DomainParams, anatomy
  constants, conventions). Everything is written into a temporary sibling
  directory that is renamed to out_dir at the end, so an interrupted call
  leaves no half-written dataset. Same arguments give byte-identical files.

  Args:
    out_dir: target directory; must not exist, be empty, or (with
      `overwrite`) hold a previous phantom dataset (it has phantoms.json):
      overwrite never deletes a directory this function did not write.
    n, domain, shape, spacing, seed, phase: as for `generate`.
    dtype: "int16" (scl_slope = max|v| / 32767, scl_inter = 0, so values
      round-trip within slope / 2) or "float32".
    labels: also write the label maps.
    overwrite: replace an existing phantom dataset at out_dir.
    progress: show a rich progress bar.

  Returns:
    The dataset directory.

  Raises:
    DataError: bad arguments, or out_dir is a file, is not empty (without
      `overwrite`) or cannot be created.
  """
  shp, sp = _check_args(n, domain, shape, spacing, seed, phase)
  if dtype not in _DTYPES:
    raise DataError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  out = pathlib.Path(out_dir)
  _check_out_dir(out, overwrite)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  except OSError as e:
    raise DataError(f"cannot create the output directory {out}: {e}") from e
  try:
    os.chmod(tmp, 0o755)
    if labels:
      (tmp / "labels").mkdir()
    rows = []
    for i, vol, row, lab in _iter_subjects(n, domain, shp, sp, int(seed), phase, labels,
                                           progress, f"writing {out.name}"):
      sid = subject_id(domain, i)
      (tmp / f"{sid}.nii.gz").write_bytes(_nifti_gz(vol, sp, dtype))
      if lab is not None:
        (tmp / "labels" / f"{sid}.nii.gz").write_bytes(_nifti_gz(lab, sp, "uint8"))
      rows.append((sid, row))
    (tmp / "attributes.csv").write_text(_attributes_csv(rows), encoding="utf-8")
    manifest = _manifest(n=n, domain=domain, shape=shp, spacing=sp, seed=int(seed),
                         phase=phase, dtype=dtype, labels=labels)
    (tmp / "phantoms.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _move_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _check_out_dir(out: pathlib.Path, overwrite: bool) -> None:
  """Refuses files, non-empty directories, and overwriting foreign directories."""
  if not out.exists() and not out.is_symlink():
    return
  if not out.is_dir():
    raise DataError(f"output path {out} exists and is not a directory")
  if not any(out.iterdir()):
    return
  if not overwrite:
    raise DataError(f"output directory {out} is not empty; choose another directory "
                    "or pass --overwrite (jaxldm data phantoms) to replace a previous phantom dataset")
  if not (out / "phantoms.json").is_file():
    raise DataError(f"refusing to overwrite {out}: it is not empty and holds no "
                    "phantoms.json, so it was not written by jaxldm data phantoms")


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Renames the finished temporary directory to `out` (replacing an old one)."""
  if out.is_dir() and not any(out.iterdir()):
    out.rmdir()
  if out.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    tmp.rename(out)


def _affine(shape: Sequence[int], spacing: np.ndarray) -> np.ndarray:
  """Voxel (i, j, k) = (w, h, d) -> world (x, y, z) mm, FOV centre at the origin."""
  d_n, h_n, w_n = shape
  dz, dy, dx = spacing
  affine = np.diag([dx, dy, dz, 1.0])
  affine[:3, 3] = [-dx * (w_n - 1) / 2.0, -dy * (h_n - 1) / 2.0, -dz * (d_n - 1) / 2.0]
  return affine


def _nifti_gz(data: np.ndarray, spacing: np.ndarray, dtype: str) -> bytes:
  """Deterministic .nii.gz bytes of a (D, H, W) array stored as (W, H, D) (RAS, no flips)."""
  import nibabel as nib   # Only needed for writing files.
  arr = np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0))
  affine = _affine(data.shape, spacing)
  slope = None
  if dtype == "int16":
    peak = float(np.max(np.abs(arr))) if arr.size else 0.0
    slope = np.float32(peak / 32767.0) if peak > 0 else np.float32(1.0)
    arr = np.clip(np.rint(arr / slope), -32767, 32767).astype(np.int16)
  else:
    arr = arr.astype(np.dtype(dtype))
  img = nib.Nifti1Image(arr, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  header = img.header
  header.set_xyzt_units("mm")
  header["descrip"] = b"jaxldm phantom"
  if slope is not None:
    header.set_slope_inter(float(slope), 0.0)
  # gzip.compress writes mtime 0 and no file name: byte-identical reruns.
  return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _attributes_csv(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
  """CSV text: subject_id then ATTRIBUTES; categorical columns as integers."""
  lines = [",".join(("subject_id",) + ATTRIBUTES)]
  for sid, row in rows:
    cells = [sid] + [str(int(row[k])) if k in ("sex", "phase") else f"{row[k]:.10g}"
                     for k in ATTRIBUTES]
    lines.append(",".join(cells))
  return "\n".join(lines) + "\n"


def _manifest(**args: Any) -> dict[str, Any]:
  """Everything needed to reproduce and interpret a written dataset."""
  from jaxldm import __version__
  dp = DOMAIN_PARAMS[args["domain"]]
  return {
      "format_version": _FORMAT_VERSION,
      "generator": "jaxldm.data.phantoms",
      "jaxldm_version": __version__,
      "arguments": {**args, "spacing": [float(s) for s in args["spacing"]],
                    "shape": list(args["shape"])},
      "subject_ids": [subject_id(args["domain"], 0), subject_id(args["domain"], args["n"] - 1)],
      "attributes": list(ATTRIBUTES),
      "labels": {str(k): v for k, v in LABELS.items()},
      "domain_params": dataclasses.asdict(dp),
      "anatomy": _ANATOMY,
      "conventions": {
          "volume": "float32 (D, H, W), D = slice axis, spacing (dz, dy, dx) mm",
          "nifti_axes": "(i, j, k) = (W, H, D), i.e. volume.transpose(2, 1, 0)",
          "affine": "diag(dx, dy, dz) + translation putting the FOV centre at (0, 0, 0); "
                    "axes point +x, +y, +z (RAS): a RAS loader does no flips",
          "center_mm": "LV cavity centroid minus FOV centre, along +y (H) and +x (W)",
          "seeding": "subject i uses np.random.SeedSequence([seed, DOMAINS.index(domain), i])",
      },
  }

# ----------------------------------------------------------------------------
# measure: classical, learning-free recovery of the attributes.
# ----------------------------------------------------------------------------

_MIN_LV_ML = 5.0          # Smallest LV blood pool accepted.
_MIN_CIRCULARITY = 0.85   # Area-weighted disc overlap of the LV pool per slice.
_MIN_CNR = 4.0            # Blood-myocardium contrast over noise sd.
_N_RAYS = 36
_MAX_WALL_MM = 40.0


@dataclasses.dataclass(frozen=True)
class _Levels:
  """Intensity levels of the normalised, smoothed image."""
  blood: float
  myo: float
  tissue: float


def measure(volume: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
  """Recovers LV/RV volume, wall thickness and LV position by classical segmentation.

  No learning and no knowledge of the generator's draws: it assumes only
  bSSFP-like contrast (bright blood, dark myocardium, intermediate tissue,
  darker lungs) and that the LV is the roughly circular bright pool near the
  FOV centre with the RV beside it. Every step is invariant to an affine
  intensity change with positive slope, so it scores raw phantoms,
  [-1, 1]-normalised volumes and generated volumes alike.

  Steps: robust percentile normalisation and light in-plane smoothing; a
  quadratic bias field fitted to the tissue class is divided out; a 3-class
  Otsu split; bright 3D components at increasing thresholds until one
  is disc-like per slice (the LV; the RV is the largest other bright
  component next to it); volumes as the soft partial-volume sum
  clip((I - ring) / (blood - myo), 0, 1) over the dilated pool, where `ring`
  is the local level just outside the pool in each slice (exact for
  through-plane partial volume at the base and apex); wall thickness as the
  median over mid-ventricular slices and 36 rays of the distance between the
  half-level crossings blood->myocardium and myocardium->tissue.

  Args:
    volume: (D, H, W) array, D the slice axis.
    spacing: (dz, dy, dx) in mm.

  Returns:
    Dict with MEASURED keys: lv_volume_ml, rv_volume_ml, myo_thickness_mm,
    center_y_mm, center_x_mm (LV centroid minus FOV centre, as in the
    attributes). Values are NaN where they cannot be measured (e.g. no LV).

  Raises:
    DataError: volume not 3-D or not numeric, or bad spacing.
  """
  img, sp = _measure_inputs(volume, spacing)
  result = {k: math.nan for k in MEASURED}
  with np.errstate(all="ignore"):
    if img is None:
      return result
    sigma = (0.0, max(0.5, 1.0 / sp[1]), max(0.5, 1.0 / sp[2]))
    smooth = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
    bias = _bias_estimate(smooth)
    img, smooth = img / bias, smooth / bias
    found = _find_lv(img, smooth, sp)
    if found is None:
      return result
    lv, others, levels = found
    voxel_ml = float(np.prod(sp)) / 1e3
    lv_frac = _pool_fractions(smooth, lv, others, levels, sp, ring_is_myo=True)
    result["lv_volume_ml"] = float(lv_frac.sum()) * voxel_ml
    weight = lv_frac.sum(axis=0)
    total = weight.sum()
    h_n, w_n = img.shape[1:]
    cy = float((weight.sum(axis=1) * np.arange(h_n)).sum() / total)
    cx = float((weight.sum(axis=0) * np.arange(w_n)).sum() / total)
    result["center_y_mm"] = float((cy - (h_n - 1) / 2.0) * sp[1])
    result["center_x_mm"] = float((cx - (w_n - 1) / 2.0) * sp[2])
    rv = _find_rv(lv, others, sp)
    if rv is not None:
      rv_frac = _pool_fractions(smooth, rv, lv | (others & ~rv), levels, sp,
                                ring_is_myo=False)
      rv_frac[lv_frac > 0] = 0.0
      result["rv_volume_ml"] = float(rv_frac.sum()) * voxel_ml
    result["myo_thickness_mm"] = _wall_thickness(smooth, lv, lv_frac, levels, sp)
  return result


def _measure_inputs(volume, spacing) -> tuple[np.ndarray | None, np.ndarray]:
  """Validates, fills non-finite values and maps the 1st..99th percentiles to 0..1.

  Returns (None, spacing) for inputs that are valid but hold no contrast.
  """
  sp = _check_spacing(spacing)
  arr = np.asarray(volume)
  if arr.ndim != 3:
    raise DataError(f"measure needs a 3-D (D, H, W) volume, got shape {arr.shape}")
  if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.integer)
                                or np.issubdtype(arr.dtype, np.floating)):
    raise DataError(f"measure needs a real-valued volume, got dtype {arr.dtype} "
                    "(take the magnitude of complex data first)")
  img = arr.astype(np.float32)
  if img.size == 0 or min(img.shape[1:]) < 3:
    return None, sp
  finite = np.isfinite(img)
  if not finite.all():
    if not finite.any():
      return None, sp
    img[~finite] = np.median(img[finite])
  lo, hi = np.percentile(img, [1.0, 99.0])
  if not hi > lo:
    return None, sp
  # Clipping far outside the 1..99% range tames outliers (a hot voxel would
  # otherwise squash every histogram) and changes nothing in a normal volume.
  return np.clip((img - np.float32(lo)) / np.float32(hi - lo), -1.0, 2.0), sp


def _bias_estimate(smooth: np.ndarray, iterations: int = 2) -> np.ndarray:
  """Smooth multiplicative bias field, fitted to the tissue class (N3-like, quadratic).

  Tissue (the middle 3-class Otsu class) fills most of the FOV and should be
  flat, so a quadratic fitted to it, normalised to median 1, estimates the
  coil shading; a global blood/tissue threshold is then meaningful everywhere.
  """
  shape = smooth.shape
  basis = _quadratic_basis(shape)
  field = np.ones(smooth.size, np.float32)
  flat = smooth.ravel()
  for _ in range(iterations):
    corrected = flat / field
    t_low, t_high = _otsu3(corrected)
    tissue = np.flatnonzero((corrected > t_low) & (corrected < t_high))
    if tissue.size < 50:
      break
    tissue = tissue[:: max(1, tissue.size // 8000)]
    a = basis[tissue]
    try:   # Normal equations: a 10x10 solve, far cheaper than an SVD here.
      coef = np.linalg.solve(a.T @ a, a.T @ flat[tissue].astype(np.float64))
    except np.linalg.LinAlgError:
      break
    fit = basis @ coef
    ref = float(np.median(fit[tissue]))
    if not ref > 0:
      break
    field = np.clip(fit / ref, 0.5, 2.0).astype(np.float32)
  return field.reshape(shape)


@functools.lru_cache(maxsize=8)
def _quadratic_basis(shape: tuple[int, int, int]) -> np.ndarray:
  """(N, 10) monomials of degree <= 2 in [-1, 1]-normalised voxel coordinates."""
  grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape],
                      indexing="ij")
  z, y, x = (g.ravel() for g in grids)
  basis = np.stack([np.ones_like(z), z, y, x, z * z, y * y, x * x, z * y, z * x, y * x], 1)
  basis.flags.writeable = False
  return basis


def _otsu3(values: np.ndarray, bins: int = 128) -> tuple[float, float]:
  """Two thresholds maximising the between-class variance of 3 classes."""
  hist, edges = np.histogram(values, bins=bins)
  centres = 0.5 * (edges[:-1] + edges[1:])
  p = hist / max(hist.sum(), 1)
  w = np.concatenate([[0.0], np.cumsum(p)])
  mu = np.concatenate([[0.0], np.cumsum(p * centres)])
  i, j = np.triu_indices(bins + 1, k=1)
  w0, w1, w2 = w[i], w[j] - w[i], 1.0 - w[j]
  m0, m1, m2 = mu[i], mu[j] - mu[i], mu[-1] - mu[j]
  valid = (w0 > 0) & (w1 > 0) & (w2 > 0)
  score = np.where(valid, m0**2 / np.where(valid, w0, 1) + m1**2 / np.where(valid, w1, 1)
                   + m2**2 / np.where(valid, w2, 1), -np.inf)
  k = int(np.argmax(score))
  return float(edges[min(i[k], bins)]), float(edges[min(j[k], bins)])


def _noise_sd(img: np.ndarray) -> float:
  """Robust noise sd: MAD of the in-plane Laplacian-like residual."""
  residual = img - ndimage.uniform_filter(img, size=(1, 3, 3), mode="nearest")
  # A 3x3 box residual keeps 8/9 of white-noise variance... scaled accordingly.
  mad = float(np.median(np.abs(residual - np.median(residual))))
  return 1.4826 * mad / math.sqrt(8.0 / 9.0)


def _disc_likeness(mask: np.ndarray, sp: np.ndarray) -> tuple[float, float, float]:
  """(circularity, centroid y mm, centroid x mm) of a 3-D component.

  Circularity: area-weighted mean over slices of the fraction of the slice's
  pixels within the equal-area disc about the slice centroid (1 for a disc,
  ~0.5 for a crescent).
  """
  num = den = 0.0
  ys_all = xs_all = 0.0
  count = 0
  for d in range(mask.shape[0]):
    ys, xs = np.nonzero(mask[d])
    if ys.size == 0:
      continue
    ys_all += ys.sum()
    xs_all += xs.sum()
    count += ys.size
    if ys.size < 6:
      continue
    y_mm, x_mm = ys * sp[1], xs * sp[2]
    r2 = ys.size * sp[1] * sp[2] / math.pi
    radius = math.sqrt(r2) + 0.5 * max(sp[1], sp[2])
    inside = (y_mm - y_mm.mean()) ** 2 + (x_mm - x_mm.mean()) ** 2 <= radius**2
    num += inside.sum()
    den += ys.size
  circ = num / den if den else 0.0
  return circ, ys_all / max(count, 1), xs_all / max(count, 1)


def _find_lv(img: np.ndarray, smooth: np.ndarray, sp: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, _Levels] | None:
  """Finds the LV blood pool; returns (LV mask, other bright voxels, levels) or None."""
  t_low, t_high = _otsu3(smooth)
  top = float(np.percentile(smooth, 99.5))
  voxel_ml = float(np.prod(sp)) / 1e3
  noise = _noise_sd(img)
  h_n, w_n = smooth.shape[1:]
  centre = np.array([(h_n - 1) / 2.0, (w_n - 1) / 2.0])
  half_fov = 0.5 * math.hypot(h_n * sp[1], w_n * sp[2])
  for frac in (0.0, 0.2, 0.4, 0.6):
    threshold = t_high + frac * (top - t_high)
    bright = smooth > threshold
    labels, n = ndimage.label(bright)
    if n == 0:
      continue
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    best, best_score = 0, -np.inf
    for k in np.argsort(sizes)[::-1][:8]:
      if sizes[k] * voxel_ml < _MIN_LV_ML:
        break
      comp = labels == k
      circ, cy, cx = _disc_likeness(comp, sp)
      dist = math.hypot((cy - centre[0]) * sp[1], (cx - centre[1]) * sp[2]) / half_fov
      score = circ - 0.5 * dist
      if circ >= _MIN_CIRCULARITY and dist < 0.6 and score > best_score:
        best, best_score = k, score
    if best == 0:
      continue
    lv = labels == best
    levels = _levels(smooth, lv, bright, t_low, t_high, sp)
    if levels is None or (levels.blood - levels.myo) < _MIN_CNR * noise:
      continue
    # Other bright structures (RV, fat) at the blood/tissue midpoint, so bright
    # tissue under residual shading is not mistaken for blood.
    others = (smooth > max(threshold, 0.5 * (levels.blood + levels.tissue))) & ~lv
    return lv, others, levels
  return None


# 4-connected in-plane neighbourhood: morphology that never crosses slices.
_PLANAR = np.zeros((3, 3, 3), bool)
_PLANAR[1] = ndimage.generate_binary_structure(2, 1)


def _in_plane(mask: np.ndarray, iterations: int) -> np.ndarray:
  """Binary dilation in-plane only (slices are independent)."""
  return ndimage.binary_dilation(mask, _PLANAR, iterations=iterations)


def _px(mm: float, sp: np.ndarray) -> int:
  """A distance in mm as a whole number of in-plane pixels (at least 1)."""
  return max(1, int(round(mm / min(sp[1], sp[2]))))


def _levels(smooth: np.ndarray, lv: np.ndarray, bright: np.ndarray, t_low: float,
            t_high: float, sp: np.ndarray) -> _Levels | None:
  """Blood (LV core), myocardium (ring just outside the LV) and tissue levels.

  Uses mid-ventricular slices (LV area >= 60% of the largest) so through-plane
  partial volume at the base/apex does not bias them.
  """
  area = lv.sum(axis=(1, 2))
  mid = area >= 0.6 * area.max()
  core = ndimage.binary_erosion(lv, _PLANAR) & mid[:, None, None]
  if not core.any():
    core = lv & mid[:, None, None]
  near = _in_plane(lv, _px(2.0, sp))
  ring = _in_plane(near, _px(2.0, sp)) & ~near & ~bright & mid[:, None, None]
  if not ring.any():
    return None
  blood = float(np.median(smooth[core]))
  myo = float(np.percentile(smooth[ring], 40))
  between = smooth[(smooth > t_low) & (smooth <= t_high)]
  tissue = float(np.median(between)) if between.size else 0.5 * (t_low + t_high)
  if not blood > myo:
    return None
  return _Levels(blood=blood, myo=myo, tissue=max(tissue, myo))


def _pool_fractions(smooth: np.ndarray, pool: np.ndarray, exclude: np.ndarray,
                    levels: _Levels, sp: np.ndarray, ring_is_myo: bool) -> np.ndarray:
  """Soft blood fraction clip((I - ring_s) / unit_s, 0, 1) around a pool.

  The footprint is the pool, its neighbour slices' footprints and a ~3.5 mm
  in-plane margin (covers the partial-volume rim), minus other bright
  structures. `ring_s` is the per-slice level just outside the footprint.
  For the LV (`ring_is_myo`) the ring is myocardium in full slices and the
  same myocardium/X mix as the pool's blood/X mix in a partial basal or
  apical slice, so unit_s = blood - myo makes partial slices count their
  true fraction. Around the RV the ring mixes septum, thin free wall and
  tissue, so unit_s = blood - ring_s (pure blood counts 1).
  """
  span = pool.copy()          # the pool's slices and their neighbours
  span[1:] |= pool[:-1]
  span[:-1] |= pool[1:]
  avoid = _in_plane(exclude, 1)
  footprint = _in_plane(span, _px(3.5, sp)) & ~avoid
  band = _in_plane(footprint, _px(2.0, sp)) & ~footprint & ~avoid
  contrast = levels.blood - levels.myo
  out = np.zeros(smooth.shape, np.float32)
  for d in range(smooth.shape[0]):
    if not footprint[d].any():
      continue
    ring_values = smooth[d][band[d]]
    ring = float(np.percentile(ring_values, 40)) if ring_values.size else levels.myo
    unit = contrast if ring_is_myo else max(levels.blood - ring, 0.3 * contrast)
    out[d] = np.clip((smooth[d] - ring) / unit, 0.0, 1.0) * footprint[d]
  return out


def _find_rv(lv: np.ndarray, others: np.ndarray, sp: np.ndarray) -> np.ndarray | None:
  """The largest other bright component within ~35 mm of the LV pool."""
  labels, n = ndimage.label(others)
  if n == 0:
    return None
  dist = ndimage.distance_transform_edt(~lv, sampling=sp)
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  near = np.asarray(ndimage.minimum(dist, labels, index=np.arange(n + 1)))
  ok = (near <= 35.0) & (sizes * float(np.prod(sp)) / 1e3 >= 2.0)
  ok[0] = False
  if not ok.any():
    return None
  k = int(np.argmax(np.where(ok, sizes, -1)))
  return labels == k


def _wall_thickness(smooth: np.ndarray, lv: np.ndarray, lv_frac: np.ndarray,
                    levels: _Levels, sp: np.ndarray) -> float:
  """Median over mid-ventricular slices and 36 rays of the myocardial band width.

  Mid-ventricular: LV area >= 70% of the largest, not the first or last LV
  slice (partial volume and the curved apex make those unreliable).
  """
  area = lv_frac.sum(axis=(1, 2))
  if not area.max() > 0:
    return math.nan
  present = np.flatnonzero(lv.any(axis=(1, 2)) & (area > 0))
  mid = [d for d in present if area[d] >= 0.7 * area.max()]
  if len(present) >= 3:
    mid = [d for d in mid if present[0] < d < present[-1]] or mid
  step = 0.25 * min(sp[1], sp[2])
  radii = np.arange(0.0, 60.0, step)
  angles = np.linspace(0.0, 2 * math.pi, _N_RAYS, endpoint=False)
  dy = np.outer(np.sin(angles), radii) / sp[1]
  dx = np.outer(np.cos(angles), radii) / sp[2]
  profiles = []
  for d in mid:
    w = lv_frac[d]
    total = w.sum()
    cy = (w.sum(axis=1) * np.arange(w.shape[0])).sum() / total
    cx = (w.sum(axis=0) * np.arange(w.shape[1])).sum() / total
    profiles.append(ndimage.map_coordinates(smooth[d], [cy + dy, cx + dx], order=1,
                                            mode="nearest"))
  if not profiles:
    return math.nan
  widths = _ray_widths(np.concatenate(profiles), levels, step)
  if widths.size < 10:
    return math.nan
  return float(np.median(widths))


def _ray_widths(prof: np.ndarray, levels: _Levels, step: float) -> np.ndarray:
  """Myocardial band width (mm) along each profile (rows), valid rays only.

  Endocardium: where the profile first falls below (blood + myo) / 2.
  Epicardium: where it next rises above the half level between the band and
  what lies outside it; first found with the global (myo + tissue) / 2, then
  refined with the ray's own band median and the peak within 4 mm outside
  (tissue, fat or RV blood), so a bright neighbour is not cut short. Both
  crossings are interpolated linearly between samples.
  """
  n, m = prof.shape
  rows = np.arange(n)
  endo_level = 0.5 * (levels.blood + levels.myo)
  epi_level = np.full(n, 0.5 * (levels.myo + levels.tissue))
  i = _first(prof < endo_level, np.zeros(n, int))
  j = _first(prof < epi_level[:, None], i)
  k = _first(prof >= epi_level[:, None], j)
  ok = (prof[:, 0] >= endo_level) & (i > 0) & (j > 0) & (k > 0)
  i, j, k = (np.where(ok, a, 1) for a in (i, j, k))
  window = np.clip(k[:, None] + np.arange(int(round(4.0 / step)) + 1)[None, :], 0, m - 1)
  outside = np.take_along_axis(prof, window, axis=1).max(axis=1)
  cols = np.arange(m)[None, :]
  band = (cols >= i[:, None]) & (cols <= k[:, None])
  ordered = np.sort(np.where(band, prof, np.inf), axis=1)
  median = ordered[rows, (band.sum(axis=1) - 1) // 2]
  local = 0.5 * (median + outside)
  k_local = _first(prof >= local[:, None], j)
  refine = k_local > 0
  k = np.where(refine, k_local, k)
  epi_level = np.where(refine, local, epi_level)
  width = _crossing(prof, k, epi_level, step) - _crossing(prof, i, endo_level, step)
  return width[ok & (width > 0.0) & (width < _MAX_WALL_MM)]


def _first(condition: np.ndarray, start: np.ndarray) -> np.ndarray:
  """Per row, the first column >= start where condition holds; -1 if none (or start < 0)."""
  cols = np.arange(condition.shape[1])[None, :]
  hits = condition & (cols >= start[:, None]) & (start[:, None] >= 0)
  return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def _crossing(prof: np.ndarray, k: np.ndarray, level, step: float) -> np.ndarray:
  """Sub-sample position (mm) where each row crosses `level` between k-1 and k."""
  rows = np.arange(len(prof))
  a, b = prof[rows, k - 1], prof[rows, k]
  diff = np.where(b != a, b - a, 1.0)
  t = np.where(b != a, (level - a) / diff, 0.5)
  return (k - 1 + np.clip(t, 0.0, 1.0)) * step
