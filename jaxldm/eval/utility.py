"""Downstream utility of synthetic volumes: what can a model trained on them do on real data?

Three studies, each a function of in-memory arrays (volumes (N, D, H, W) in the preprocessed
intensity range, attributes as {name: (N,)} with NaN = missing) that returns a plain dict:

  (a) `train_on_synthetic_test_on_real` (TSTR): the attribute regressor/classifier
      (`jaxldm.models.regressor`) trained on synthetic volumes + the attributes they were
      conditioned on, tested on held-out real volumes; the same trained on real volumes is the
      reference. Pearson r / MAE per continuous attribute, accuracy / AUROC per categorical one.
  (b) `dp_pretraining_utility` (Osuala et al. 2024): a binary classifier (ES/ED phase, or a
      binarised attribute: `binarize`) trained with DP-SGD on real data at a given epsilon, from
      scratch vs after non-private pretraining on synthetic volumes (synthetic data from a DP
      generator, or from public data, costs no further privacy). The DP engine is the project's:
      Poisson batches (`privacy.sampling.PoissonBatcher`), per-example clipping and noise once per
      batch (`privacy.noise.private_grad`), sigma from `privacy.accounting.calibrate_noise_multiplier`.
      AUROC (rank-based) on held-out real volumes.
  (c) `denoising_utility` (Shi et al. 2023): a small residual 3D denoiser trained on synthetic vs
      real volumes with Gaussian noise added, PSNR / SSIM on held-out real volumes, and a paired
      Wilcoxon signed-rank test between the two (pairs = test volumes, metrics averaged over seeds).

Uncertainty: every study repeats training over `seeds` (init, data order, noise) and reports, per
metric, the mean, the std and a Student-t confidence interval of the mean over seeds
(`seed_summary`), plus the per-seed values. Everything is deterministic for the given seeds except
the DP-SGD runs of (b): their Poisson sampling and noise seeds are secret, drawn from OS entropy
per run, unless `noise_seed=` fixes them (reproducible, NOT private: tests and research grids only,
flagged in the result's "noise_seed"). See docs/privacy.md.

All outputs are aggregates over test sets: nothing per training example leaves these functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage, stats

from jaxldm import fitting
from jaxldm.eval.controllability import auroc, compare_predictions
from jaxldm.eval.regressor_fit import Fitter
from jaxldm.infer import regressor as regressor_lib
from jaxldm.infer.checkpoints import iterate_batches
from jaxldm.models import conv
from jaxldm.models.layers import init_params
from jaxldm.models.regressor import TargetSpec, attributes_from_dict
from jaxldm.privacy import accounting
from jaxldm.privacy import ledger as ledger_lib

# A CPU-sized regressor; pass `model=` for bigger volumes (keys as in regressor `model`).
DEFAULT_MODEL = {"channels": (8, 16, 32), "num_res_blocks": 1, "kernel": (1, 3, 3), "stride": (1, 2, 2),
                 "dtype": "float32"}


# ---------------------------------------------------------------------------------------------
# statistics over seeds
# ---------------------------------------------------------------------------------------------
# Natural ranges of the metrics: a t-interval over few seeds can overshoot them, and is clipped.
BOUNDS = {"pearson_r": (-1.0, 1.0), "accuracy": (0.0, 1.0), "auroc": (0.0, 1.0), "mae": (0.0, math.inf),
          "ssim": (-1.0, 1.0)}


def seed_summary(values: Sequence[float], confidence: float = 0.95,
                 bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[str, Any]:
  """Mean, std (ddof 1) and the Student-t CI of the mean over seeds; NaN CI for a single seed.

  NaN values (e.g. an AUROC with one class absent) are left out of the statistics and counted.
  The interval is clipped to `bounds`, the metric's natural range (with 2 seeds t = 12.7, so an
  unclipped interval of a correlation easily leaves [-1, 1]).
  """
  v = np.asarray(values, np.float64)
  ok = v[np.isfinite(v)]
  n = int(ok.size)
  mean = float(ok.mean()) if n else math.nan
  std = float(ok.std(ddof=1)) if n > 1 else math.nan
  if n > 1:
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    ci = [max(mean - half, bounds[0]), min(mean + half, bounds[1])]
  else:
    ci = [math.nan, math.nan]
  return {"mean": mean, "std": std, "ci": ci, "n": n, "n_nan": int(v.size - n), "values": v.tolist()}


def _summaries(per_seed: list[dict[str, float]], confidence: float) -> dict[str, Any]:
  return {k: seed_summary([d[k] for d in per_seed], confidence, BOUNDS.get(k, (-math.inf, math.inf)))
          for k in per_seed[0]} if per_seed else {}


def binarize(values, threshold: float | None = None) -> tuple[np.ndarray, float]:
  """(labels 0/1 = values > threshold, threshold); the default threshold is the median."""
  v = np.asarray(values, np.float64)
  if not np.all(np.isfinite(v)):
    raise ValueError("binarize: values contain NaN or inf; drop the missing ones first")
  threshold = float(np.median(v)) if threshold is None else float(threshold)
  return (v > threshold).astype(np.float64), threshold


def _check_volumes(volumes, name: str) -> np.ndarray:
  v = np.asarray(volumes, np.float32)
  if v.ndim != 4 or len(v) < 1:
    raise ValueError(f"{name} must be (N >= 1, D, H, W), got shape {v.shape}")
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name} contains NaN or inf")
  return v


def _optim(learning_rate: float):
  optim = fitting.optim_config(lr=learning_rate)
  optim.ema_decay = 0.0  # The fitted parameters themselves are evaluated.
  return optim


def _common_layout(*specs: TargetSpec) -> list[TargetSpec]:
  """The same head layout for every spec (class counts = the max over them); stats kept."""
  k = tuple(max(c) for c in zip(*(s.num_classes for s in specs))) if specs[0].categorical else ()
  return [TargetSpec(s.names, s.categorical, k, s.mean, s.std) for s in specs]


# ---------------------------------------------------------------------------------------------
# (a) train on synthetic, test on real
# ---------------------------------------------------------------------------------------------
def train_on_synthetic_test_on_real(
    synthetic_volumes, synthetic_attributes: Mapping[str, Any], test_volumes,
    test_attributes: Mapping[str, Any], *, real_volumes=None, real_attributes: Mapping[str, Any] | None = None,
    attributes: Sequence[str] | None = None, categorical: Sequence[str] = ("sex", "phase"),
    model: Mapping[str, Any] | None = None, steps: int = 200, batch_size: int = 8,
    learning_rate: float = 2e-3, seeds: Sequence[int] = (0, 1, 2), confidence: float = 0.95,
    progress: bool = True) -> dict[str, Any]:
  """TSTR for the attribute regressor/classifier, with train-on-real as the reference.

  Args:
    synthetic_volumes: (Ns, D, H, W) generated volumes.
    synthetic_attributes: {name: (Ns,)} what they were conditioned on (NaN = not conditioned).
    test_volumes, test_attributes: held-out REAL volumes and their true attributes.
    real_volumes, real_attributes: the real training set (optional): the train-on-real reference.
    attributes: names to predict; default every name in both synthetic and test attributes.
    categorical: names (among those) predicted as classes.
    model: regressor architecture (DEFAULT_MODEL keys); steps, batch_size, learning_rate: training.
    seeds: one training run per seed and source; confidence: of the intervals over seeds.
    progress: progress bars.

  Returns:
    {"attributes", "categorical", "seeds", "steps", "n_synthetic", "n_real", "n_test",
     "train_on_synthetic": {name: {"pearson_r", "mae"} or {"accuracy"[, "auroc"]}: seed_summary},
     "train_on_real": same (if real data was given)}.
  """
  sources = {"synthetic": (_check_volumes(synthetic_volumes, "synthetic_volumes"), synthetic_attributes)}
  if real_volumes is not None:
    sources["real"] = (_check_volumes(real_volumes, "real_volumes"), real_attributes or {})
  test_volumes = _check_volumes(test_volumes, "test_volumes")
  names = tuple(attributes) if attributes else tuple(k for k in synthetic_attributes if k in test_attributes)
  if not names:
    raise ValueError("no attribute is in both the synthetic and the test attributes; pass attributes=")
  categorical = tuple(c for c in categorical if c in names)
  specs = {}
  for src, (vols, attrs) in sources.items():
    values, mask = attributes_from_dict(attrs, names, len(vols))
    specs[src] = (TargetSpec.fit(names, values, mask, categorical), values, mask)
  layouts = _common_layout(*(s for s, _, _ in specs.values()))
  model_ = regressor_lib.build_model(dict(model or DEFAULT_MODEL), layouts[0].num_outputs)
  fitter = Fitter(model_, layouts[0], _optim(learning_rate), steps, batch_size)
  result: dict[str, Any] = {"attributes": list(names), "categorical": list(categorical), "seeds": list(seeds),
                            "steps": steps, "n_test": len(test_volumes)}
  for (src, (vols, _)), spec in zip(sources.items(), layouts):
    _, values, mask = specs[src]
    encoded = spec.encode(values, mask)
    per_seed: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
      params = fitter.fit(vols, encoded, seed, progress=progress, description=f"TSTR {src} seed {seed}")
      predicted, probs = regressor_lib.predict(model_, params, spec, test_volumes)
      scores = {k: p[:, 1] for k, p in probs.items() if p.shape[1] == 2}
      cmp = compare_predictions(predicted, test_attributes, categorical=categorical, scores=scores, n_boot=0)
      for name, a in cmp["attributes"].items():
        per_seed.setdefault(name, []).append({"pearson_r": a["pearson_r"], "mae": a["mae"]})
      for name, a in cmp["categorical"].items():
        per_seed.setdefault(name, []).append({k: a[k] for k in ("accuracy", "auroc") if k in a})
    result[f"n_{src}"] = len(vols)
    result[f"train_on_{src}"] = {name: _summaries(rows, confidence) for name, rows in per_seed.items()}
  return result


# ---------------------------------------------------------------------------------------------
# (b) DP-SGD classifier with and without synthetic pretraining
# ---------------------------------------------------------------------------------------------
def _binary(labels, name: str, n: int) -> np.ndarray:
  y = np.asarray(labels, np.float64).ravel()
  if y.shape != (n,) or not np.all((y == 0) | (y == 1)):
    raise ValueError(f"{name} must be {n} labels, each 0 or 1 (use binarize() for a continuous attribute)")
  return y


def dp_pretraining_utility(
    pretrain_volumes, pretrain_labels, train_volumes, train_labels, test_volumes, test_labels, *,
    epsilon: float, delta: float = 1e-5, steps: int = 100, sampling_rate: float | None = None,
    l2_clip_norm: float = 1.0, microbatch_size: int = 4, pretrain_steps: int = 100, batch_size: int = 8,
    learning_rate: float = 2e-3, dp_learning_rate: float | None = None, accountant: str = "rdp",
    model: Mapping[str, Any] | None = None, seeds: Sequence[int] = (0, 1, 2), confidence: float = 0.95,
    progress: bool = True, noise_seed: int | None = None) -> dict[str, Any]:
  """DP-SGD binary classifier on real data, from scratch vs pretrained on synthetic volumes.

  Args:
    pretrain_volumes, pretrain_labels: synthetic (or public) volumes with 0/1 labels; used
      non-privately (they carry no further privacy cost).
    train_volumes, train_labels: the private real training set, 0/1 labels.
    test_volumes, test_labels: held-out real volumes, 0/1 labels.
    epsilon, delta: the DP target; sigma is calibrated for (sampling_rate, steps, delta) with
      `accountant` ("rdp" is fast; "pld" tighter). epsilon = inf trains with clipping and no noise.
    steps: DP-SGD steps; sampling_rate: Poisson rate q (default batch_size / N).
    l2_clip_norm: C; microbatch_size: examples per vmapped chunk of the clipped sum.
    pretrain_steps, batch_size, learning_rate: the non-private pretraining.
    dp_learning_rate: DP phase learning rate (default learning_rate).
    model: regressor architecture (DEFAULT_MODEL keys).
    seeds: repetitions (initialisation and pretraining order; public); confidence: of the
      intervals over seeds.
    noise_seed: None (default): every DP-SGD run draws its Poisson-sampling and noise seeds from
      OS entropy, so the epsilon means something and two calls differ. An int: each run's seeds
      derive from (noise_seed, seed, arm), reproducible and NOT private (tests, research grids);
      flagged in the result.

  Returns:
    {"epsilon_target", "epsilon" (of ONE DP-trained classifier), "epsilon_all_runs" (all
     2 x len(seeds) DP runs on the same training set, composed: what reporting every score costs),
     "delta", "noise_multiplier", "sampling_rate", "steps", "pretrain_steps", "l2_clip_norm",
     "accountant", "noise_seed" (ledger.OS_ENTROPY or ledger.FIXED_SEED), "seeds", "n_pretrain",
     "n_train", "n_test", "dp_only": {"auroc", "accuracy"}, "pretrained_dp": {...},
     "pretrained_only": {...} (the synthetic-pretrained model before any private step),
     "auroc_gain": seed_summary of the per-seed pretrained_dp - dp_only AUROC, "data_owner_only":
     the keys above that are not covered by the epsilon (the dataset sizes)}.
    The scores are post-processing of the DP classifiers as far as the training set goes; they are
    computed on the held-out real test set, which DP does not protect.
  """
  if noise_seed is not None and (int(noise_seed) < 0 or any(int(s) < 0 for s in seeds)):
    raise ValueError(f"noise_seed {noise_seed} and seeds {list(seeds)} must be >= 0")
  pre_v = _check_volumes(pretrain_volumes, "pretrain_volumes")
  tr_v = _check_volumes(train_volumes, "train_volumes")
  te_v = _check_volumes(test_volumes, "test_volumes")
  pre_y = _binary(pretrain_labels, "pretrain_labels", len(pre_v))
  tr_y = _binary(train_labels, "train_labels", len(tr_v))
  te_y = _binary(test_labels, "test_labels", len(te_v))
  q = float(sampling_rate) if sampling_rate is not None else min(1.0, batch_size / len(tr_v))
  if math.isinf(epsilon):
    sigma, eps = 0.0, math.inf
  else:
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=epsilon, sampling_rate=q, steps=steps,
                                                  delta=delta, accountant=accountant)
    eps = accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta,
                             accountant=accountant)
  # Every DP run of the study trains on the same private set: k runs of T steps of one mechanism
  # compose as one run of k T steps.
  n_runs = 2 * len(seeds)
  eps_all = math.inf if math.isinf(eps) else (
      accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps * n_runs, delta=delta,
                         accountant=accountant) if n_runs else 0.0)
  spec = TargetSpec(("label",), ("label",), (2,))
  enc = lambda y: spec.encode(y[:, None], np.ones((len(y), 1), np.float32))
  model_ = regressor_lib.build_model(dict(model or DEFAULT_MODEL), spec.num_outputs)
  pre_fitter = Fitter(model_, spec, _optim(learning_rate), pretrain_steps, batch_size)
  dp_fitter = Fitter(model_, spec, _optim(dp_learning_rate or learning_rate), steps, batch_size)

  def scores(params) -> dict[str, float]:
    p = regressor_lib.predict(model_, params, spec, te_v)[1]["label"][:, 1]
    return {"auroc": auroc(p, te_y), "accuracy": float(((p >= 0.5) == (te_y == 1)).mean())}

  rows: dict[str, list[dict[str, float]]] = {"dp_only": [], "pretrained_dp": [], "pretrained_only": []}
  dp_kwargs = dict(sampling_rate=q, noise_multiplier=sigma, l2_clip_norm=l2_clip_norm,
                   microbatch_size=microbatch_size, progress=progress)
  # Secret seeds by default: None lets every fit_private run draw fresh ones from OS entropy (the
  # two arms of a seed get independent noise: they are two releases of the same data).
  run_seed = lambda seed, arm: None if noise_seed is None else _derived_seed(noise_seed, seed, arm)
  for seed in seeds:
    pre = pre_fitter.fit(pre_v, enc(pre_y), seed, progress=progress, description=f"pretrain seed {seed}")
    rows["pretrained_only"].append(scores(pre))
    rows["dp_only"].append(scores(dp_fitter.fit_private(
        tr_v, enc(tr_y), seed, description=f"DP-SGD seed {seed}", noise_seed=run_seed(seed, 0), **dp_kwargs)))
    rows["pretrained_dp"].append(scores(dp_fitter.fit_private(
        tr_v, enc(tr_y), seed, params=pre, description=f"pretrained DP-SGD seed {seed}",
        noise_seed=run_seed(seed, 1), **dp_kwargs)))
  gain = [a["auroc"] - b["auroc"] for a, b in zip(rows["pretrained_dp"], rows["dp_only"])]
  provenance = ledger_lib.OS_ENTROPY if noise_seed is None else ledger_lib.FIXED_SEED
  out = {"epsilon_target": float(epsilon), "epsilon": float(eps), "epsilon_all_runs": float(eps_all),
         "delta": delta, "noise_multiplier": float(sigma), "sampling_rate": q, "steps": steps,
         "pretrain_steps": pretrain_steps, "l2_clip_norm": l2_clip_norm, "accountant": accountant,
         "noise_seed": provenance, "seeds": list(seeds), "n_pretrain": len(pre_v), "n_train": len(tr_v),
         "n_test": len(te_v)}
  out.update({k: _summaries(v, confidence) for k, v in rows.items()})
  out["auroc_gain"] = seed_summary(gain, confidence)
  out["data_owner_only"] = ["n_train", "n_test"]  # Dataset sizes: not covered by the epsilon.
  return out


def _derived_seed(noise_seed: int, seed: int, arm: int) -> int:
  """A reproducible 63-bit seed per (fixed noise seed, study seed, arm): tests/research grids only."""
  words = np.random.SeedSequence([int(noise_seed), int(seed), int(arm)]).generate_state(2, np.uint32)
  return ((int(words[0]) << 32) | int(words[1])) >> 1


# ---------------------------------------------------------------------------------------------
# (c) a denoiser trained on synthetic vs real volumes
# ---------------------------------------------------------------------------------------------
class Denoiser3D(nn.Module):
  """A few convolutions predicting the noise, subtracted from the input (residual learning).

  No normalisation layers (nothing couples examples); the last conv starts at zero so the untrained
  denoiser is the identity and training can only improve on the noisy input.
  """
  features: int = 16
  layers: int = 4
  kernel: tuple[int, int, int] = (1, 3, 3)

  @nn.compact
  def __call__(self, x):  # (B, D, H, W, 1) -> (B, D, H, W, 1)
    h = x
    for i in range(self.layers - 1):
      h = nn.swish(nn.Conv(self.features, self.kernel, padding="SAME", name=f"conv{i}")(h))
    noise = nn.Conv(1, self.kernel, padding="SAME", kernel_init=nn.initializers.zeros, name="out")(h)
    return x - noise


def psnr(clean, estimate, data_range: float) -> np.ndarray:
  """Per-volume PSNR in dB, 10 log10(range^2 / MSE); inputs (N, D, H, W)."""
  mse = np.mean((np.asarray(clean, np.float64) - np.asarray(estimate, np.float64)) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range**2 / mse)


def ssim(clean, estimate, data_range: float, sigma: float = 1.5) -> np.ndarray:
  """Per-volume SSIM (Wang et al. 2004): in-plane Gaussian windows (sigma 1.5), averaged over slices.

  Slice-wise because cardiac SAX slices are thick (10 mm): structure lives in-plane. Constants
  K1 = 0.01, K2 = 0.03 of `data_range`; borders by reflection.
  """
  x = np.asarray(clean, np.float64)
  y = np.asarray(estimate, np.float64)
  g = lambda a: ndimage.gaussian_filter(a, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=3.5)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = g(x), g(y)
  vx, vy, cxy = g(x * x) - mx * mx, g(y * y) - my * my, g(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return s.mean(axis=(1, 2, 3))


@conv.cached_per_route(maxsize=8)
def _denoiser_programs(model: Denoiser3D, learning_rate: float, noise_std: float):
  """(optimizer, jitted training step, jitted apply), once per process for these settings and
  convolution route: repeated utility evaluations reuse the traces."""
  tx = optax.adam(learning_rate)
  apply = jax.jit(lambda p, x: model.apply(p, x[..., None])[..., 0])
  return tx, _denoiser_step(model, tx, noise_std), apply


def _denoiser_step(model: Denoiser3D, tx, noise_std: float):
  def step(params, opt_state, clean, rng):
    # RNG: the noise of step s is drawn from rng = fold_in(PRNGKey(seed), s).
    noisy = clean + noise_std * jax.random.normal(rng, clean.shape, clean.dtype)

    def loss_fn(p):
      return jnp.mean(jnp.square(model.apply(p, noisy[..., None])[..., 0] - clean))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree_util.tree_map(lambda p, u: p + u, params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """Paired two-sided Wilcoxon signed-rank test of a vs b (NaN p when every difference is 0)."""
  d = np.asarray(a) - np.asarray(b)
  out = {"n": int(d.size), "median_difference": float(np.median(d)) if d.size else math.nan}
  if d.size < 1 or np.all(d == 0):
    return {**out, "statistic": math.nan, "p_value": math.nan}
  res = stats.wilcoxon(a, b)
  return {**out, "statistic": float(res.statistic), "p_value": float(res.pvalue)}


def denoising_utility(synthetic_volumes, real_volumes, test_volumes, *, noise_std: float = 0.1,
                      data_range: float = 2.0, steps: int = 200, batch_size: int = 4,
                      learning_rate: float = 1e-3, features: int = 16, layers: int = 4,
                      kernel: Sequence[int] = (1, 3, 3), seeds: Sequence[int] = (0, 1, 2),
                      confidence: float = 0.95, progress: bool = True) -> dict[str, Any]:
  """Denoiser trained on synthetic vs on real volumes, scored on held-out real volumes.

  Args:
    synthetic_volumes, real_volumes: (N, D, H, W) training sets (clean; noise is added on the fly).
    test_volumes: held-out real volumes (N, D, H, W); each seed adds one fixed noise draw, the SAME
      for both denoisers, so their scores are paired.
    noise_std: std of the added Gaussian noise, in intensity units ([-1, 1] data: 0.1 = 5% of range).
    data_range: intensity range for PSNR/SSIM (2 for the default [-1, 1] preprocessing).
    steps, batch_size, learning_rate, features, layers, kernel: training and architecture.
    seeds: repetitions; confidence: of the intervals over seeds.

  Returns:
    {"noise_std", "data_range", "steps", "seeds", "n_synthetic", "n_real", "n_test",
     "noisy_input": {"psnr", "ssim"} (mean over test volumes and seeds),
     "train_on_synthetic": {"psnr", "ssim": seed_summary of the test-set mean},
     "train_on_real": {...},
     "wilcoxon": {"psnr": {...}, "ssim": {...}} (synthetic - real, paired over test volumes after
     averaging each volume's metric over seeds)}.
  """
  sets = {"synthetic": _check_volumes(synthetic_volumes, "synthetic_volumes"),
          "real": _check_volumes(real_volumes, "real_volumes")}
  test = _check_volumes(test_volumes, "test_volumes")
  model = Denoiser3D(features=features, layers=layers, kernel=tuple(kernel))
  tx, step_fn, apply = _denoiser_programs(model, float(learning_rate), float(noise_std))
  per_volume = {src: {"psnr": [], "ssim": []} for src in sets}
  noisy_scores = {"psnr": [], "ssim": []}
  per_seed = {src: [] for src in sets}
  for seed in seeds:
    noisy = (test + noise_std * np.random.default_rng([seed, 2024]).standard_normal(test.shape)).astype(np.float32)
    noisy_scores["psnr"].append(psnr(test, noisy, data_range))
    noisy_scores["ssim"].append(ssim(test, noisy, data_range))
    for src, vols in sets.items():
      params = init_params(model, jax.random.PRNGKey(seed), jnp.zeros((1, *vols.shape[1:], 1), jnp.float32))
      opt_state = fitting.init_optimizer(tx, params)
      bar, task = fitting.progress_bar(steps, 0, f"denoiser {src} seed {seed}")
      with fitting.maybe_progress(bar, progress):
        for step in range(steps):
          idx = fitting.batch_indices(seed, step, len(vols), batch_size)
          params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(vols[idx]), fitting.step_key(seed, step))
          if progress:
            bar.update(task, completed=step + 1)
      fitting.check_finite(steps, {"loss": loss})
      denoised = np.concatenate([np.asarray(apply(params, jnp.asarray(chunk)))[:valid]
                                 for valid, chunk in iterate_batches(noisy, min(8, len(noisy)))])
      p, s = psnr(test, denoised, data_range), ssim(test, denoised, data_range)
      per_volume[src]["psnr"].append(p)
      per_volume[src]["ssim"].append(s)
      per_seed[src].append({"psnr": float(p.mean()), "ssim": float(s.mean())})
  out: dict[str, Any] = {"noise_std": noise_std, "data_range": data_range, "steps": steps, "seeds": list(seeds),
                         "n_synthetic": len(sets["synthetic"]), "n_real": len(sets["real"]), "n_test": len(test),
                         "noisy_input": {k: float(np.mean(v)) for k, v in noisy_scores.items()}}
  for src in sets:
    out[f"train_on_{src}"] = _summaries(per_seed[src], confidence)
  out["wilcoxon"] = {m: _wilcoxon(np.mean(per_volume["synthetic"][m], axis=0), np.mean(per_volume["real"][m], axis=0))
                     for m in ("psnr", "ssim")}
  return out
