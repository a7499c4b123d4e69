"""The sections of `jaxldm evaluate`'s report, one object each (in the manner of big_vision's evaluators).

A section owns everything about one kind of measurement, so that adding a metric is one new class
in `SECTIONS` and nothing else:
  run(context)        computes its result (a JSON-ready dict, report.json[section.key]);
  headlines(result)   the few numbers a reader looks at first, {name: value}; `HEADLINES` gives each
                      a short label (report.md, the printed summary, `jaxldm ablate`'s columns) and
                      says whether it is also a top-level key of report.json;
  markdown(result)    its block of report.md, which shows every headline with its label;
  release(result)     which of its report keys may leave the data owner (docs/privacy.md); the block
                      goes under the heading of `placement(result)`.

`Context` carries what several sections read (real, training and synthetic volumes, their features
and latents, the run's records); the expensive parts are computed on first use, so a section list
that needs no features computes none. `jaxldm.eval.evaluate` builds the context, runs the sections
in order and writes report.json / report.md; `jaxldm.ablate` and `jaxldm.demo` read the headlines
through these objects (`study_values`, `digest`).

This module imports no JAX at the top (ablate and demo read the headline metadata without models);
the extractor, the autoencoder and the privacy ledger are imported where they are first needed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxldm.atomic import atomic_open
from jaxldm.eval import controllability as ctl_lib
from jaxldm.eval import fid
from jaxldm.eval import memorization as mem
from jaxldm.eval import safeguard as sg

# The three kinds of output of docs/privacy.md, in report.md's order; report.json lists each kind's keys.
COVERED, HELDOUT, OWNER = "covered_by_dp", "heldout_reference", "data_owner_only"
PARTS = (COVERED, HELDOUT, OWNER)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
  """A number as report.md and the printed summary show it ('-' for a missing one)."""
  if x is None:
    return "-"
  if isinstance(x, float):
    if not np.isfinite(x):
      return "inf" if x > 0 else ("nan" if np.isnan(x) else "-inf")
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
  return str(x)


def _mean_finite(values: dict) -> float | None:
  finite = [v for v in values.values() if v is not None and np.isfinite(v)]
  return float(np.mean(finite)) if finite else None


def _at_smallest_key(values: dict) -> float | None:
  return values[min(values, key=float)] if values else None


@dataclasses.dataclass(frozen=True)
class Headline:
  """What a reader of one number needs besides its value: its label and how tables show it.

  A value is a number, None (does not apply to this run), or {item: number} (per attribute, per
  prior); a study table (`jaxldm ablate`) shows a dict as one number, `reduce`d.
  """
  name: str  # Key in report.json (top level when `flat`), demo.json and, unless `column`, ablation.csv.
  label: str  # Short label; report.md shows it next to the value.
  flat: bool = True  # Also a top-level key of report.json (readers of the flat keys rely on these).
  spec: str = ".3g"  # Format of the value in study tables.
  spread: bool = True  # Study tables give the confidence interval over seeds (not for settings' constants).
  per: str = ""  # Dict values: what the items are, e.g. "prior" (the printed summary says "prior 0.01: ...").
  reduce: Callable[[dict], float | None] | None = None  # Dict values: the one number of a study table...
  reduced: str = ""  # ...and how it was taken (in the column label).
  column: str = ""  # Study column name when it differs from `name` (a reduced dict).
  plot: bool = False  # `jaxldm ablate` plots it against epsilon.

  @property
  def column_name(self) -> str:
    return self.column or self.name

  @property
  def column_label(self) -> str:
    return f"{self.label} ({self.reduced})" if self.reduced else self.label

  def scalar(self, value):
    """The value a study table holds: a dict reduced to one number."""
    if isinstance(value, dict):
      return self.reduce(value) if self.reduce else None
    return value

  def text(self, value) -> str:
    """'label value' (dicts: 'label item: value, ...') for the printed summary."""
    if isinstance(value, dict):
      items = ", ".join(f"{self.per + ' ' if self.per else ''}{k}: {fmt(v)}" for k, v in value.items())
      return f"{self.label} {items or '-'}"
    return f"{self.label} {fmt(value)}"


# ---------------------------------------------------------------------------------------------
# The context every section reads
# ---------------------------------------------------------------------------------------------
def version_tag(extractor) -> str:
  """Extractor name + a short hash of its version: cache files never mix extractors."""
  return f"{extractor.name}-{hashlib.sha256(extractor.version.encode()).hexdigest()[:12]}"


def cached_features(extractor, volumes: np.ndarray, cache_dir: pathlib.Path, label: str) -> np.ndarray:
  """Features of a fixed real set, cached by extractor version and a hash of the volumes."""
  digest = hashlib.sha256(np.ascontiguousarray(volumes).tobytes()).hexdigest()[:16]
  path = cache_dir / f"features-{label}-{version_tag(extractor)}-{digest}.npz"
  if path.is_file():
    with np.load(path, allow_pickle=False) as z:
      if str(z["extractor_version"]) == extractor.version:
        return z["features"]
  feats = extractor(volumes)
  cache_dir.mkdir(parents=True, exist_ok=True)
  with atomic_open(path, "wb") as f:
    np.savez(f, features=feats, extractor_version=np.str_(extractor.version))
  return feats


@dataclasses.dataclass
class Context:
  """What the sections of one evaluation share. Built by `evaluate` from the run and its options;
  features, latents and the ledger are computed on first use and kept (each once per evaluation)."""
  workdir: pathlib.Path  # The LDM run.
  out: pathlib.Path  # Where the report, figures and caches go.
  opts: Any  # jaxldm.eval.evaluate.Options.
  info: dict  # The run's ldm.json.
  columns: list[str]  # Its conditioning attributes.
  spacing: tuple[float, ...]
  real_v: np.ndarray  # Held-out real volumes (FID reference, memorization validation set).
  train_v: np.ndarray  # The run's training volumes.
  syn_v: np.ndarray  # The samples, their conditioning values and mask (N, A).
  values: np.ndarray
  mask: np.ndarray
  sampler_z: np.ndarray | None = None  # The sampler's latents of syn_v, when it saved them.
  is_phantom: bool = False  # The real set is phantoms (phantoms.measure can score controllability).
  status: Callable[[str], None] = lambda _: None

  @property
  def cache(self) -> pathlib.Path:
    return self.out / "cache"

  @functools.cached_property
  def extractor(self):
    from jaxldm.eval.features import get_extractor  # JAX and the extractor's weights.

    self.status(f"features ({self.opts.features})")
    return get_extractor(self.opts.features, weights=self.opts.feature_weights, batch_size=self.opts.batch_size)

  @functools.cached_property
  def real_f(self) -> np.ndarray:
    return cached_features(self.extractor, self.real_v, self.cache, "real")

  @functools.cached_property
  def train_f(self) -> np.ndarray:
    return cached_features(self.extractor, self.train_v, self.cache, "train")

  @functools.cached_property
  def syn_f(self) -> np.ndarray:
    return self.extractor(self.syn_v)

  @functools.cached_property
  def _autoencoder(self):
    from jaxldm.infer import autoencoder  # JAX and the models.

    self.status("latents (autoencoder)")
    model, params, _ = autoencoder.load_autoencoder(self.info["autoencoder_workdir"])
    scale, batch = float(self.info["scale_factor"]), self.opts.batch_size
    return (lambda v: autoencoder.encode_latents(model, params, v, scale, batch),
            lambda z: autoencoder.decode_latents(model, params, z, scale, batch))

  def encode(self, volumes: np.ndarray) -> np.ndarray:
    return self._autoencoder[0](volumes)

  @functools.cached_property
  def train_z(self) -> np.ndarray:
    return self.encode(self.train_v)

  @functools.cached_property
  def real_z(self) -> np.ndarray:
    return self.encode(self.real_v)

  @functools.cached_property
  def _syn_z(self) -> tuple[np.ndarray, str]:
    z = self.sampler_z
    if z is not None and z.shape == (len(self.syn_v), *self.train_z.shape[1:]):
      return z, "sampler"
    # Samples without their latents (e.g. from `jaxldm sample`): re-encoding loses what the
    # autoencoder's round trip loses, so this rate is a lower bound.
    return self.encode(self.syn_v), "re-encoded from the sample volumes (a lower bound)"

  @property
  def syn_z(self) -> np.ndarray:
    return self._syn_z[0]

  @property
  def latent_source(self) -> str:
    return self._syn_z[1]

  @functools.cached_property
  def recon_f(self) -> np.ndarray:
    """Features of the autoencoder's reconstructions of the training volumes (the detection ceiling)."""
    recon_v = self._autoencoder[1](self.train_z)
    return cached_features(self.extractor, recon_v, self.cache, "train-recon")

  @functools.cached_property
  def private(self) -> bool:
    """The run trained with DP (it has a privacy ledger)."""
    from jaxldm.privacy.ledger import LEDGER_FILENAME  # JAX (the ledger module).

    return (self.workdir / LEDGER_FILENAME).is_file()


# ---------------------------------------------------------------------------------------------
# The section interface
# ---------------------------------------------------------------------------------------------
class Section:
  """One part of the report. Subclasses set `key`, `name`, `part`, `HEADLINES` and define `run`,
  `headlines` and `markdown`; the rest has defaults."""
  key: str = ""  # report.json key of the result.
  name: str = ""  # Progress message while it runs.
  part: str = OWNER  # Release kind of its numbers (what study tables assume when the run is not at hand).
  HEADLINES: tuple[Headline, ...] = ()

  def run(self, ctx: Context) -> dict:
    raise NotImplementedError

  def headlines(self, result: dict) -> dict[str, Any]:
    """{headline name: value} for every entry of HEADLINES."""
    return {}

  def markdown(self, result: dict) -> str:
    """Its block of report.md (shows every headline's label and value)."""
    return ""

  def placement(self, result: dict) -> str:
    """Under which report.md heading its block goes (one of PARTS)."""
    return self.part

  def release(self, result: dict) -> dict[str, list[str]]:
    """{release kind: report.json entries}: its key and its top-level headlines, by default under `placement`."""
    return {self.placement(result): [self.key, *(h.name for h in self.HEADLINES if h.flat)]}

  def figures(self, result: dict) -> list[str]:
    """Files it wrote under OUT that report.md shows."""
    return []

  def digest(self, result: dict) -> dict[str, Any]:
    """What a side-by-side comparison of runs keeps (demo.json): the headlines by default."""
    return self.headlines(result)


def _table(rows: Sequence[tuple[str, str]]) -> list[str]:
  return ["| metric | value |", "|---|---|", *(f"| {label} | {value} |" for label, value in rows)]


# ---------------------------------------------------------------------------------------------
# Privacy
# ---------------------------------------------------------------------------------------------
def privacy_section(workdir: pathlib.Path, kappas) -> dict:
  """The run's privacy ledger (epsilon, delta, sigma, q, steps, ...), the composed epsilon of every DP
  stage on the same private data, and the ReRo bound."""
  from jaxldm.privacy import reconstruction  # dp-accounting and JAX.
  from jaxldm.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

  path = pathlib.Path(workdir) / LEDGER_FILENAME
  if not path.is_file():
    return {"private": False, "epsilon": float("inf"), "note": "non-private run: no privacy ledger"}
  ledger = json.loads(path.read_text())
  out = {"private": True, **{k: ledger.get(k) for k in (
      "epsilon_so_far", "delta", "noise_multiplier", "sampling_rate", "steps", "l2_clip_norm", "dataset_size",
      "accountant", "target_epsilon", "noise_seed_provenance")}}
  out["epsilon"] = out.pop("epsilon_so_far")
  if ledger.get("upstream"):  # Earlier DP stages on the same private data (docs/privacy.md, "Stages compose").
    out["stages"] = [dict(u) for u in ledger["upstream"]]
    out["composed_epsilon"] = PrivacyLedger.load(str(path)).composed_epsilon()
  if ledger.get("steps", 0) > 0 and ledger.get("noise_multiplier", 0) > 0:
    out["rero"] = reconstruction.rero_summary(noise_multiplier=ledger["noise_multiplier"],
                                              sampling_rate=ledger["sampling_rate"], steps=ledger["steps"],
                                              kappas=kappas)
  return out


def composed_lines(p: dict) -> list[str]:
  """The composed epsilon of every DP stage that touched the same private data (docs/privacy.md,
  "Stages compose"); none when this run is the only one."""
  if not p.get("stages"):
    return ["", "No other DP stage trained on this private data: this run's epsilon is the pipeline's."]
  lines = ["", "Stages trained on the same private data (composed by dp-accounting, same accountant and delta):", "",
           "| stage | steps | sigma | q | epsilon |", "|---|---|---|---|---|"]
  for st in p["stages"]:
    lines.append(f"| {st['stage']} ({st['workdir']}) | {st['steps']} | {fmt(st['noise_multiplier'])} | "
                 f"{fmt(st['sampling_rate'])} | {fmt(st['epsilon'])} |")
  lines.append(f"| this run | {p['steps']} | {fmt(p['noise_multiplier'])} | {fmt(p['sampling_rate'])} | "
               f"{fmt(p['epsilon'])} |")
  lines += ["", f"**Composed epsilon of the pipeline: {fmt(p['composed_epsilon'])}** at delta {fmt(p['delta'])}."]
  return lines


def privacy_lines(p: dict) -> list[str]:
  if not p.get("private"):
    return [f"{p.get('note', 'non-private run')} (epsilon {fmt(p.get('epsilon'))}): nothing in this report is "
            "covered by DP. The samples of a non-private model may reproduce its training data; they are listed "
            "with the data owner's outputs."]
  lines = _table([("epsilon (delta)", f"{fmt(p['epsilon'])} ({fmt(p['delta'])})")])
  for kappa, bound in zip((p.get("rero") or {}).get("kappas", []), (p.get("rero") or {}).get("bounds", [])):
    lines.append(f"| ReRo bound at prior {kappa} | {fmt(bound)} |")
  lines += ["", f"epsilon {fmt(p['epsilon'])} at delta {fmt(p['delta'])} ({p['accountant']} accountant), "
            f"sigma {fmt(p['noise_multiplier'])}, q {fmt(p['sampling_rate'])}, {p['steps']} steps, "
            f"C {fmt(p['l2_clip_norm'])}; noise seed: {p['noise_seed_provenance']}."]
  lines += composed_lines(p)
  lines += ["", "epsilon covers the diffusion model's training data only (not the public pretraining data, "
            "and not the autoencoder unless it was trained with DP). Covered: the samples (volumes and "
            "latents) and the model's parameters, with the numbers in this section."]
  return lines


class Privacy(Section):
  """The DP guarantee of the run: what the released samples and model are covered by."""
  key, name, part = "privacy", "privacy", COVERED
  HEADLINES = (Headline("epsilon", "epsilon", spread=False),
               Headline("delta", "delta", spread=False),
               Headline("rero_bound", "ReRo bound", per="prior", spread=False, reduce=_at_smallest_key,
                        reduced="smallest prior"))

  def run(self, ctx: Context) -> dict:
    return privacy_section(ctx.workdir, ctx.opts.kappas)

  def headlines(self, p: dict) -> dict[str, Any]:
    rero = p.get("rero")
    return {"epsilon": p.get("epsilon"), "delta": p.get("delta"),
            "rero_bound": dict(zip((str(k) for k in rero["kappas"]), rero["bounds"])) if rero else None}

  def markdown(self, p: dict) -> str:
    return "\n".join(privacy_lines(p))

  def release(self, p: dict) -> dict[str, list[str]]:
    """Private runs: every number but the dataset size is covered (post-processing of the DP model).
    Non-private runs: nothing here is covered and nothing is about the training data; none listed."""
    if not p.get("private"):
      return {}
    return {COVERED: ["epsilon", "delta", "rero_bound", *(f"privacy.{k}" for k in p if k != "dataset_size")],
            OWNER: ["privacy.dataset_size"]}


# ---------------------------------------------------------------------------------------------
# Quality against the held-out set
# ---------------------------------------------------------------------------------------------
def _diversity(volumes: np.ndarray, seed: int) -> float | None:
  try:
    return float(fid.ms_ssim_diversity(volumes, data_range=2.0, seed=seed))
  except (TypeError, ValueError):  # Too few volumes or slices too small for 5 scales.
    return None


def quality(real_f, syn_f, real_v, syn_v, extractor, cache_dir: pathlib.Path, seed: int) -> dict:
  """FID (standard Frechet distance of features), KID, precision/recall, MS-SSIM diversity."""
  stats_path = cache_dir / f"fid-ref-{version_tag(extractor)}.npz"
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


class Quality(Section):
  """The samples against the held-out real volumes in the extractor's feature space."""
  key, name, part = "quality", "quality", HELDOUT
  HEADLINES = (Headline("fid", "FID", plot=True), Headline("kid", "KID"))

  def run(self, ctx: Context) -> dict:
    ctx.cache.mkdir(parents=True, exist_ok=True)
    return quality(ctx.real_f, ctx.syn_f, ctx.real_v, ctx.syn_v, ctx.extractor, ctx.cache, ctx.opts.seed)

  def headlines(self, q: dict) -> dict[str, Any]:
    return {"fid": q["fid"], "kid": q["kid"]}

  def markdown(self, q: dict) -> str:
    ex = q["extractor"]
    return "\n".join(_table([
        (f"FID ({ex})", fmt(q["fid"])), (f"KID ({ex})", f"{fmt(q['kid'])} ± {fmt(q['kid_std'])}"),
        ("precision / recall", f"{fmt(q['precision'])} / {fmt(q['recall'])}"),
        ("MS-SSIM diversity synthetic / real",
         f"{fmt(q['ms_ssim_diversity_synthetic'])} / {fmt(q['ms_ssim_diversity_real'])}")]))


# ---------------------------------------------------------------------------------------------
# Memorization (image features and latents) and the release safeguard
# ---------------------------------------------------------------------------------------------
def memorization(train_f, val_f, syn_f, syn_v, train_v, out: pathlib.Path, figure: bool,
                 ceiling_f=None) -> dict:
  """Dar et al.'s criterion in the feature extractor's space.

  ceiling_f: features of the autoencoder's reconstructions of the training volumes. An LDM that
  reproduces a training latent exactly still shows the user its reconstruction, so their copy rate
  is the most this criterion can report for this autoencoder (the detection ceiling).
  """
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


class Memorization(Section):
  """Image-space memorization: do samples reproduce training volumes (as the extractor sees them)?"""
  key, name, part = "memorization", "memorization", OWNER
  HEADLINES = (Headline("copy_rate", "copy rate", spec=".2f", plot=True),
               Headline("train_copied_rate", "training volumes copied", spec=".2f"),
               Headline("nn_correlation", "median nearest correlation", flat=False, spec=".4f"))

  def run(self, ctx: Context) -> dict:
    return memorization(ctx.train_f, ctx.real_f, ctx.syn_f, ctx.syn_v, ctx.train_v, ctx.out,
                        ctx.opts.training_images, ceiling_f=ctx.recon_f)

  def headlines(self, m: dict) -> dict[str, Any]:
    # The median nearest correlation is Dar et al.'s statistic before thresholding: a graded view
    # of memorization next to the copy rate.
    return {"copy_rate": m["synthetic_copy_rate"], "train_copied_rate": m["train_copied_rate"],
            "nn_correlation": m.get("median_correlation")}

  def markdown(self, m: dict) -> str:
    lines = ["### Memorization (Dar et al. 2023)", "", *_table([
        ("copy rate (synthetic that are copies)", fmt(m["synthetic_copy_rate"])),
        ("training volumes copied", fmt(m["train_copied_rate"])),
        ("median nearest correlation", fmt(m["median_correlation"])),
        ("training set size", fmt(m["n_train"])), ("memorization validation volumes", fmt(m["n_validation"]))]),
        "", f"tau = {fmt(m['tau'])} (95th percentile of each training volume's correlation to its nearest of "
        f"{m['n_validation']} validation volumes); a sample whose nearest training volume correlates above tau is "
        f"a copy. Max nearest correlation: {fmt(m['max_correlation'])}."]
    if "autoencoder_ceiling" in m:
      lines += ["", f"Detection ceiling: {fmt(m['autoencoder_ceiling'])} of the autoencoder's reconstructions of the "
                f"training volumes count as copies (median correlation {fmt(m['autoencoder_median_correlation'])}): "
                "an LDM that memorized every training latent would score about that."]
    if "warning" in m:
      lines += ["", f"**Warning:** {m['warning']}."]
    if "figure" in m:
      lines += ["", f"![nearest neighbours]({m['figure']})", "",
                "*Shows training volumes next to their nearest samples.*"]
    return "\n".join(lines)

  def figures(self, m: dict) -> list[str]:
    return [m["figure"]] if "figure" in m else []


def latent_memorization(train_z, val_z, syn_z, source: str) -> dict:
  """Dar et al.'s criterion on the LDM's own output: Pearson correlation of flattened latents.

  The diffusion model learns the distribution of training LATENTS; the autoencoder is fixed and
  public. Here a sample is a copy when its latent correlates with its nearest training latent more
  than tau, the 95th percentile of the training latents' correlation to their nearest held-out
  latent. Neither the autoencoder's reconstruction error nor the feature extractor caps what this
  can see: an LDM that reproduces a training latent scores correlation 1. Aggregates only.
  """
  flat = lambda z: np.asarray(z, np.float64).reshape(len(z), -1)
  tau = mem.copy_threshold(flat(train_z), flat(val_z), percentile=95.0)
  rates = mem.copy_rates(flat(syn_z), flat(train_z), tau)
  return {"tau": float(tau), "percentile": 95.0, "synthetic_copy_rate": rates["synthetic_copy_rate"],
          "train_copied_rate": rates["train_copied_rate"],
          "max_correlation": float(np.max(rates["nn_correlations"])),
          "median_correlation": float(np.median(rates["nn_correlations"])),
          "latents": source, "n_train": len(train_z), "n_validation": len(val_z)}


class LatentMemorization(Section):
  """Latent-space memorization: the same criterion on the sampler's latents (not capped by the autoencoder)."""
  key, name, part = "latent_memorization", "latent memorization", OWNER
  HEADLINES = (Headline("latent_copy_rate", "latent copy rate", spec=".2f", plot=True),
               Headline("latent_nn_correlation", "latent median nearest correlation", flat=False, spec=".3f"))

  def run(self, ctx: Context) -> dict:
    return latent_memorization(ctx.train_z, ctx.real_z, ctx.syn_z, ctx.latent_source)

  def headlines(self, lm: dict) -> dict[str, Any]:
    return {"latent_copy_rate": lm["synthetic_copy_rate"], "latent_nn_correlation": lm.get("median_correlation")}

  def markdown(self, lm: dict) -> str:
    return "\n".join(["### Memorization in latent space", "", *_table([
        ("latent copy rate", fmt(lm["synthetic_copy_rate"])), ("training latents copied", fmt(lm["train_copied_rate"])),
        ("latent median nearest correlation", fmt(lm["median_correlation"]))]),
        "", "Latent space (the LDM's own output, before decoding): tau = "
        f"{fmt(lm['tau'])} from training vs held-out latents; max nearest correlation {fmt(lm['max_correlation'])}; "
        f"sample latents: {lm['latents']}."])


def safeguard(syn_v, train_v) -> dict:
  """Shi et al.: which samples the release filter would reject (RMSE to every training volume below
  the 5th percentile of the training set's own nearest-neighbour RMSE)."""
  threshold = sg.percentile_threshold(train_v, percentile=5.0, metric="rmse")
  res = sg.apply_safeguard(syn_v, train_v, threshold, metric="rmse")
  released = int(len(res.released_indices))
  return {"metric": "rmse", "threshold": float(threshold), "threshold_source": "5th percentile of training NN RMSE",
          "n": len(syn_v), "released": released, "rejected": len(syn_v) - released,
          "rejected_fraction": (len(syn_v) - released) / max(len(syn_v), 1)}


class Safeguard(Section):
  """How many samples the release safeguard would hold back."""
  key, name, part = "safeguard", "safeguard", OWNER
  HEADLINES = (Headline("safeguard_rejected_fraction", "safeguard would reject", spec=".2f"),)

  def run(self, ctx: Context) -> dict:
    return safeguard(ctx.syn_v, ctx.train_v)

  def headlines(self, s: dict) -> dict[str, Any]:
    return {"safeguard_rejected_fraction": s["rejected_fraction"]}

  def markdown(self, s: dict) -> str:
    return "\n".join(["### Release safeguard (Shi et al. 2023)", "", *_table([
        ("safeguard would reject", f"{s['rejected']} of {s['n']} = {fmt(s['rejected_fraction'])} "
                                   f"(RMSE threshold {fmt(s['threshold'])}, {s['threshold_source']})")])])


# ---------------------------------------------------------------------------------------------
# Controllability
# ---------------------------------------------------------------------------------------------
REGRESSOR_NOTE = "a regressor trained without DP on real data"


def controllability_section(syn_v, values, mask, columns, spacing, opts, is_phantom: bool) -> dict:
  """phantoms.measure (phantom data) or a trained attribute regressor (opts.regressor) against the conditioning."""
  conditioned = {c: np.where(mask[:, j] > 0, values[:, j], np.nan) for j, c in enumerate(columns)}
  if not any(np.any(np.isfinite(v)) for v in conditioned.values()):
    return {"skipped": "the samples were not conditioned on any attribute"}
  if opts.regressor:
    return ctl_lib.regressor_controllability(opts.regressor, syn_v, conditioned, seed=opts.seed)
  if is_phantom:
    return ctl_lib.controllability(syn_v, spacing, conditioned, seed=opts.seed, progress=True)
  return {"skipped": "not phantom data: pass --regressor WORKDIR (jaxldm train --config regressor)"}


def controllability_lines(ctl: dict) -> list[str]:
  lines = [f"Source: {ctl.get('source', '-')}; n = {ctl.get('n', '-')}; controllability r = Pearson r between the "
           "conditioned and the measured value.", "",
           "| attribute | conditioned on | Pearson r [CI] | MAE | n used |", "|---|---|---|---|---|"]
  for name, a in ctl.get("attributes", {}).items():
    ci = a.get("pearson_r_ci") or [None, None]
    lines.append(f"| {name} | {a.get('conditioned_on', '-')} | {fmt(a.get('pearson_r'))} "
                 f"[{fmt(ci[0])}, {fmt(ci[1])}] | {fmt(a.get('mae'))} | {a.get('n', '-')} |")
  for name, c in ctl.get("categorical", {}).items():
    lines.append(f"\n{name}: accuracy {fmt(c.get('accuracy'))}" +
                 (f", AUROC {fmt(c.get('auroc'))}" if c.get("auroc") is not None else ""))
  return lines


class Controllability(Section):
  """Do the samples show the attributes they were conditioned on? Phantoms: measured exactly (against
  the held-out conditioning); real data: a regressor trained without DP on real data (the data owner's)."""
  key, name = "controllability_details", "controllability"
  part = OWNER  # Without the result at hand: it may come from a non-DP regressor of real data.
  HEADLINES = (Headline("controllability", "controllability r", spec=".2f", reduce=_mean_finite,
                        reduced="mean over attributes", column="controllability_r", plot=True),)

  def run(self, ctx: Context) -> dict:
    return controllability_section(ctx.syn_v, ctx.values, ctx.mask, ctx.columns, ctx.spacing, ctx.opts,
                                   ctx.is_phantom)

  @staticmethod
  def private(ctl: dict) -> bool:
    """True when it came from a non-DP model of real data (--regressor), not phantoms.measure."""
    source = (ctl or {}).get("source")
    return source is not None and source != "phantoms.measure"

  def placement(self, ctl: dict) -> str:
    return OWNER if self.private(ctl) else HELDOUT

  def headlines(self, ctl: dict) -> dict[str, Any]:
    return {"controllability": {k: v.get("pearson_r") for k, v in ctl.get("attributes", {}).items()}}

  def markdown(self, ctl: dict) -> str:
    if self.private(ctl):
      return "\n".join([f"### Controllability ({REGRESSOR_NOTE})", "", *controllability_lines(ctl)])
    body = [f"Skipped: {ctl['skipped']}."] if "skipped" in ctl else controllability_lines(ctl)
    return "\n".join(["### Controllability", "", *body])

  def release(self, ctl: dict) -> dict[str, list[str]]:
    return {self.placement(ctl): ["controllability", "controllability_details"]}

  def digest(self, ctl: dict) -> dict[str, Any]:
    """Per attribute r, MAE and how many measurements failed, the phase accuracy, and n."""
    attrs = {k: {m: v.get(m) for m in ("pearson_r", "mae", "n", "n_nan_predicted")}
             for k, v in ctl.get("attributes", {}).items()}
    phase = ctl.get("categorical", {}).get("phase", {})
    return {"n_samples": ctl.get("n"), "controllability": attrs,
            "phase": {m: phase.get(m) for m in ("accuracy", "n", "n_nan_predicted") if m in phase}}


# ---------------------------------------------------------------------------------------------
# The registry and what readers of reports use
# ---------------------------------------------------------------------------------------------
# The sections `jaxldm evaluate` runs, in order (report.md keeps this order within each heading).
# A new metric: one Section subclass, appended here.
SECTIONS: list[Section] = [Privacy(), Quality(), Memorization(), LatentMemorization(), Safeguard(), Controllability()]


def registered(sections: Sequence[Section] | None = None) -> list[Section]:
  """`sections`, or the registry as it is now (tests may extend it)."""
  return list(SECTIONS if sections is None else sections)


def headline_specs(sections: Sequence[Section] | None = None) -> list[Headline]:
  """Every headline of the sections, in order."""
  return [h for s in registered(sections) for h in s.HEADLINES]


def study_values(report: dict, sections: Sequence[Section] | None = None) -> dict[str, Any]:
  """{column name: number or None} of one report, for a study table (`jaxldm ablate`).

  Read from each section's result, so reports that predate a section give None for its columns.
  """
  out: dict[str, Any] = {}
  for s in registered(sections):
    result = report.get(s.key)
    values = s.headlines(result) if result is not None else {}
    out.update({h.column_name: h.scalar(values.get(h.name)) for h in s.HEADLINES})
  return out


def digest(report: dict, sections: Sequence[Section] | None = None) -> dict[str, Any]:
  """Each section's digest of one report (demo.json); sections the report lacks are left out."""
  out: dict[str, Any] = {}
  for s in registered(sections):
    if s.key in report:
      out.update(s.digest(report[s.key]))
  return out
