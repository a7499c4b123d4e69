"""The heart model of the phantoms: per-subject anatomy, its pose in the field of view, and the attributes.

Why a module of its own: the attribute table is only the truth of what is rendered if it is computed
from the same solved geometry the renderer draws; this module owns that geometry (closed-form
volumes, the ED/ES solve, the fit into the FOV) and the attribute row derived from it, so the
renderer (`rendering`) only rasterises what it is given.

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

Domains: a controlled shift between a "public" multi-centre, pathological
cohort (ACDC/M&Ms-like) and a "private" healthy-ish population cohort
(UK-Biobank-like); every number lives in one frozen `DomainParams` per domain
(see `DOMAIN_PARAMS`), written to phantoms.json by `write_dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import integrate, optimize

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
