"""`jaxldm evaluate`: everything the papers measured, for one trained LDM, in one report.

  jaxldm evaluate --workdir runs/ldm_dp --real runs/phantoms/heldout --n 64

Inputs: the LDM run (its config.json says which data it trained on and how they were preprocessed),
a directory of REAL reference volumes that the run did NOT train on (FID/KID reference and the
validation set of the memorization threshold), and a feature extractor (`ssl3d` by default: the
project's own contrastive encoder, trained with `jaxldm train --config ssl`).

Sections (jaxldm.eval.sections.SECTIONS, in this order; each skipped with a reason when it does
not apply). Every section is one object that computes its result, names its headline numbers and
writes its block of report.md; adding a metric is one new class in that list:
  privacy          the run's privacy ledger (epsilon, delta, sigma, q, steps) and the ReRo bound;
  quality          FID (standard Frechet distance of features), KID (mean, std over subsets),
                   precision/recall, MS-SSIM diversity of samples and of real volumes;
  memorization     Dar et al.: tau = 95th percentile of training->validation nearest correlations,
                   fraction of samples that are copies and of training volumes copied;
  latent memorization  the same criterion on the sampler's latents;
  safeguard        Shi et al.: how many samples the release filter would reject (RMSE to every
                   training volume below the 5th percentile of training nearest-neighbour RMSE);
  controllability  phantoms.measure vs the conditioned attributes (phantom data), or a trained
                   attribute regressor (--regressor WORKDIR) for real data.
The samples they all read: n volumes drawn with the real set's attributes as conditions (or read
from --samples DIR), kept in OUT/samples so a re-run reuses them.

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
import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError
from jaxldm.data.dataset import find_volumes, read_attributes
from jaxldm.data.defaults import build_dataset
from jaxldm.data.nifti import read_nifti
from jaxldm.eval import sections as sections_lib
from jaxldm.infer import generate
from jaxldm.infer.pictures import save_mid_slices

# The latent-space criterion as a function (its home is the sections module).
latent_memorization = sections_lib.latent_memorization

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
  guidance: float | None = None  # Classifier-free guidance scale (None: the run's sampling.guidance_scale).
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
# The whole evaluation
# ---------------------------------------------------------------------------------------------
def with_run_defaults(workdir: pathlib.Path, opts: Options) -> Options:
  """`opts` with an unset guidance taken from the run's sampling.guidance_scale (as `jaxldm sample`)."""
  if opts.guidance is not None:
    return opts
  defaults = generate.sampling_defaults(generate.run_config(workdir))
  return dataclasses.replace(opts, guidance=defaults["guidance_scale"])


def evaluate(workdir, real, out, opts: Options | None = None, *,
             status: Callable[[str], None] = lambda _: None,
             sections: list[sections_lib.Section] | None = None) -> dict:
  """Runs the sections (default: the registry, jaxldm.eval.sections.SECTIONS) in order and writes
  OUT/report.json, OUT/report.md and figures."""
  opts = opts or Options()
  workdir, real, out = pathlib.Path(workdir), pathlib.Path(real), pathlib.Path(out)
  if not (workdir / "ldm.json").is_file():
    raise FileNotFoundError(f"--workdir {workdir}: not an LDM run (no ldm.json)")
  opts = with_run_defaults(workdir, opts)
  if opts.samples is None and opts.n < 2:
    raise ConfigError(f"--n {opts.n}: FID and KID need at least 2 samples")
  out.mkdir(parents=True, exist_ok=True)
  data_cfg = generate.run_data_config(workdir)
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

  ctx = sections_lib.Context(workdir=workdir, out=out, opts=opts, info=info, columns=columns, spacing=spacing,
                             real_v=real_v, train_v=train_v, syn_v=syn_v, values=values, mask=mask, sampler_z=syn_z,
                             is_phantom=(real / "phantoms.json").is_file(), status=status)
  extractor = ctx.extractor
  report: dict[str, Any] = {
      "workdir": str(workdir), "real": str(real), "train": str(train_root),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "samples": {"n": len(syn_v), "how": how, "guidance": opts.guidance, "steps": opts.steps, "seed": opts.seed},
      "extractor": {"name": extractor.name, "version": extractor.version,
                    "preprocessing": extractor.preprocessing},
  }
  chosen = sections_lib.registered(sections)
  results = []
  for section in chosen:
    status(section.name)
    result = section.run(ctx)
    _add(report, section.key, result, section)
    results.append((section, result))
  k = min(8, len(real_v), len(syn_v))
  save_mid_slices(np.concatenate([real_v[:k], syn_v[:k]]), out / "real_vs_synthetic.png",
                  titles=[f"real {i}" for i in range(k)] + [f"synthetic {i}" for i in range(k)], columns=k)
  report["figures"] = ["real_vs_synthetic.png"] + [f for s, r in results for f in s.figures(r)]
  for section, result in results:  # The flat keys readers of report.json use (epsilon, fid, copy_rate, ...).
    heads = section.headlines(result)
    for h in section.HEADLINES:
      if h.flat:
        _add(report, h.name, heads[h.name], section)
  report.update(release_labels(results, private=ctx.private, samples_dir=how in ("drawn", "reused"),
                               figures=report["figures"]))
  write(report, out, chosen)
  return report


def _add(report: dict, key: str, value, section: sections_lib.Section) -> None:
  """A section's entry of report.json; two sections (or a section and the run metadata) never share a key."""
  if key in report:
    raise ValueError(f"section {type(section).__name__}: report key {key!r} is taken already")
  report[key] = value


def release_labels(results, *, private: bool, samples_dir: bool, figures: list[str]) -> dict:
  """Which report keys and OUT files may leave the data owner (docs/privacy.md).

  Entries are top-level report keys, "section.key" for one field of a section, or paths under OUT
  (a name with "/" or a file extension): each section lists its own (`Section.release`); the samples
  and figures are listed here. Keys in none of the lists are run metadata (paths, dates, the
  extractor, the figure list).
  """
  lists: dict[str, list[str]] = {part: [] for part in sections_lib.PARTS}
  for section, result in results:
    for part, entries in section.release(result).items():
      lists[part] += entries
  # The samples (volumes and latents.npy) are post-processing of the model: covered when it is DP,
  # the data owner's when not (a non-private model may reproduce its training data).
  samples = ["samples"] + (["samples/"] if samples_dir else [])  # "samples/": written to OUT/samples.
  lists[sections_lib.COVERED if private else sections_lib.OWNER] += samples
  if samples_dir:
    lists[sections_lib.HELDOUT].append("samples/attributes.csv")  # The conditions: the held-out set's rows.
  lists[sections_lib.OWNER] += list(figures)  # Real volumes: held-out and (nearest neighbours) training.
  return {
      **lists,
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


def _ran(report: dict, sections) -> list[tuple[sections_lib.Section, dict]]:
  """(section, result) of the sections whose result the report holds."""
  return [(s, report[s.key]) for s in sections_lib.registered(sections) if s.key in report]


def summary(report: dict, sections=None) -> str:
  """The lines `jaxldm evaluate` and `jaxldm demo` print at the end: every section's headlines, the
  data owner's on a line of their own, labelled as report.md is."""
  owner = set(report.get(sections_lib.OWNER, ()))
  shown: list[str] = []
  private: list[str] = []
  for section, result in _ran(report, sections):
    values = section.headlines(result)
    for h in section.HEADLINES:
      # A headline inside its section's result (not a top-level key) is released as the section is.
      (private if (h.name if h.flat else section.key) in owner else shown).append(h.text(values[h.name]))
  return "  ".join(shown) + "\nfor the data owner only (do not release): " + "  ".join(private)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


RELEASED_HEADING = "## Released under DP"
HELDOUT_HEADING = "## Against the held-out reference set"
OWNER_HEADING = "## For the data owner only — do not release"


def markdown(report: dict, sections=None) -> str:
  """Three parts: released under DP, measured against the held-out set, and the data owner's; each
  section's block goes under the part its result belongs to, in section order."""
  blocks: dict[str, list[str]] = {part: [] for part in sections_lib.PARTS}
  for section, result in _ran(report, sections):
    text = section.markdown(result)
    if text:
      blocks[section.placement(result)] += [text, ""]
  ex = report["extractor"]
  lines = [f"# jaxldm evaluation of `{report['workdir']}`", "",
           f"{report['created']}; {report['samples']['n']} samples ({report['samples']['how']}); real reference "
           f"`{report['real']}`; training data `{report['train']}`.", "",
           "report.json lists what each section holds: `covered_by_dp`, `heldout_reference` and "
           "`data_owner_only` (docs/privacy.md).", "",
           RELEASED_HEADING, "", *blocks[sections_lib.COVERED],
           HELDOUT_HEADING, "",
           "The samples against the held-out real volumes: nothing about the training data beyond the samples, "
           "but DP does not protect the held-out set (aggregates only; release them if its owner agrees).", "",
           f"Features: `{ex['name']}` version `{ex['version']}` ({ex['preprocessing']}). Every feature-based "
           "number in this report (FID, KID, precision/recall and the image-space memorization numbers) comes "
           "from this extractor.", "", *blocks[sections_lib.HELDOUT],
           OWNER_HEADING, "",
           "*Computed from the training data (or a non-DP model of real data) outside the DP mechanism, or "
           "images of real volumes: the epsilon does not cover anything in this section. Keep it with the "
           "data owner; do not release it.*", ""]
  if "samples" in report.get(sections_lib.OWNER, ()):
    lines += ["The samples (OUT/samples) of this non-private model: not covered by DP.", ""]
  lines += [*blocks[sections_lib.OWNER],
            "### Figures", "", "![real vs synthetic](real_vs_synthetic.png)", "",
            "*Shows held-out real volumes next to samples.*"]
  return "\n".join(lines + [""])


def write(report: dict, out: pathlib.Path, sections=None) -> None:
  with atomic_open(out / REPORT_JSON, "w") as f:
    json.dump(report, f, indent=2, default=_json_default, allow_nan=True)
    f.write("\n")
  with atomic_open(out / REPORT_MD, "w") as f:
    f.write(markdown(report, sections))
