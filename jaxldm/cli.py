"""The `jaxldm` command. Intentionally thin: parse arguments, call library functions.

Errors a user can cause (files, configs, budgets) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from jaxldm import __version__
from jaxldm.config import ConfigError, load_config, split_override_args
from jaxldm.data.errors import DataError


def _user_errors() -> tuple[type[BaseException], ...]:
  from jaxldm.fitting import TrainingError
  return (DataError, ConfigError, TrainingError, FileNotFoundError, FileExistsError)


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected integers like 12,64,64, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected numbers like 10,1.8,1.8, got {text!r}") from None


def _shape_and_spacing(args) -> tuple[tuple[int, ...], tuple[float, ...]]:
  from jaxldm.data.defaults import SIZES

  shape, spacing = SIZES[args.size]
  shape = args.shape or shape
  spacing = args.spacing or spacing
  if len(shape) != 3 or min(shape) < 1:
    raise DataError(f"--shape must be three positive integers D,H,W, got {shape}")
  if len(spacing) != 3 or min(spacing) <= 0:
    raise DataError(f"--spacing must be three positive numbers dz,dy,dx in mm, got {spacing}")
  return shape, spacing


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def cmd_data_phantoms(args) -> int:
  from jaxldm.data import phantoms

  shape, spacing = _shape_and_spacing(args)
  out = phantoms.write_dataset(args.out, args.n, domain=args.domain, shape=shape, spacing=spacing,
                               seed=args.seed, dtype=args.dtype, overwrite=args.overwrite,
                               progress=not args.quiet)
  print(f"wrote {args.n} {args.domain} phantoms {'x'.join(map(str, shape))} at "
        f"{'x'.join(f'{s:g}' for s in spacing)} mm to {out}")
  return 0


def cmd_data_inspect(args) -> int:
  from jaxldm.data import inspect

  report = inspect.inspect_directory(args.dir, csv_path=args.csv, progress=not args.quiet)
  inspect.render(report)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
  return 1 if report["problems"] else 0


def cmd_data_prepare(args, overrides) -> int:
  from rich.console import Console

  from jaxldm.data.defaults import build_dataset

  config = load_config(args.config, overrides)
  dataset = build_dataset(config.data, progress=True)
  bad = dataset.preprocess_all()  # Every volume, so every bad file is listed (not just the first).
  for _, problem in bad:
    print(f"jaxldm: bad volume: {problem}", file=sys.stderr)
  console = Console()
  if bad and not args.exclude_bad:
    raise DataError(f"{len(bad)} of {len(dataset)} volume(s) in {dataset.root} cannot be prepared (listed above); "
                    "fix or remove them, or rerun with --exclude-bad FILE to leave them out")
  if bad:
    from jaxldm.atomic import atomic_open

    if len(bad) == len(dataset):
      raise DataError(f"all {len(bad)} volume(s) in {dataset.root} cannot be prepared (listed above); nothing to exclude to")
    ids = sorted(dataset.excluded | {sid for sid, _ in bad})
    with atomic_open(args.exclude_bad) as f:
      f.write(f"# volumes of {dataset.root} left out by jaxldm data prepare (data.exclude)\n")
      f.writelines(f"{sid}\n" for sid in ids)
    config.data.exclude = str(args.exclude_bad)
    dataset = build_dataset(config.data)
    console.print(f"left out {len(bad)} bad volume(s), listed in {args.exclude_bad}; train with "
                  f"--config.data.exclude={args.exclude_bad}", highlight=False, soft_wrap=True)
  dataset.progress = False  # The cache is full: arrays() only reads it.
  volumes, attributes, mask = dataset.arrays()
  console.print(f"{len(dataset)} volumes -> array {tuple(volumes.shape)} {volumes.dtype}, "
                f"range [{volumes.min():.3g}, {volumes.max():.3g}], cached in {dataset.cache_dir}")
  for j, name in enumerate(dataset.columns):
    present = mask[:, j] > 0
    vals = attributes[present, j]
    stats = f"mean {vals.mean():.4g} std {vals.std():.4g}" if vals.size else "no values"
    console.print(f"  {name:24s} coverage {present.mean():6.1%}  {stats}")
  return 0


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
TRAINERS = {
    "autoencoder": "jaxldm.train.autoencoder",
    "ldm": "jaxldm.train.ldm",
    "regressor": "jaxldm.train.regressor",
    "ssl": "jaxldm.train.ssl",
}


def cmd_train(args, overrides) -> int:
  import importlib

  from jaxldm.train import distributed

  # Before anything touches a JAX backend: multi-host runs join the coordinator first.
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  config = load_config(args.config, overrides)
  trainer = config.get("trainer")
  if trainer not in TRAINERS:
    raise ConfigError(f"config key 'trainer': {trainer!r} is not one of {', '.join(TRAINERS)}")
  importlib.import_module(TRAINERS[trainer]).train_and_evaluate(config, args.workdir)
  return 0


def _attribute_pairs(items) -> dict[str, float | str]:
  """--attr NAME=VALUE pairs: numbers, or category names (checked against the run's data.categories)."""
  out = {}
  for item in items or ():
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
      raise ConfigError(f"--attr {item!r} must look like name=value, e.g. --attr lv_edv_ml=150 or --attr sex=F")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      out[name.strip()] = value.strip()
  return out


def cmd_sample(args) -> int:
  from jaxldm.infer import generate

  fixed = _attribute_pairs(args.attribute)
  # Names, categories and ranges are checked before any model is loaded.
  for warning in generate.check_conditioning(args.workdir, args.n, csv_path=args.attributes_csv, fixed=fixed):
    print(f"jaxldm: warning: {warning}", file=sys.stderr)
  run_config = generate.run_config(args.workdir)
  defaults = generate.sampling_defaults(run_config)  # The run's sampling.* unless a flag says otherwise.
  guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
  steps = defaults["num_steps"] if args.steps is None else args.steps
  sampling = dict(seed=args.seed, guidance_scale=guidance, method=args.method, num_steps=steps,
                  csv_path=args.attributes_csv, fixed=fixed, batch_size=args.batch_size)
  report = None
  if args.safeguard:
    extractor = None
    if args.safeguard_metric == "embedding":  # Built first: a missing weight file fails before any sampling.
      from jaxldm.eval.features import get_extractor
      extractor = get_extractor(args.safeguard_features, weights=args.safeguard_weights)
    volumes, values, mask, info, report = generate.generate_safeguarded(
        args.workdir, args.n, data_dir=args.safeguard_data, metric=args.safeguard_metric,
        threshold=args.safeguard_threshold, percentile=args.safeguard_percentile or generate.DEFAULT_SAFEGUARD_PERCENTILE,
        extractor=extractor, max_rounds=args.safeguard_max_rounds, **sampling)
  else:
    given = [f for f in ("data", "threshold", "percentile", "weights") if getattr(args, f"safeguard_{f}") is not None]
    if given:
      raise ConfigError(f"--safeguard-{given[0]} has no effect without --safeguard")
    volumes, values, mask, info = generate.generate(args.workdir, args.n, **sampling)
  spacing = run_config["data"]["spacing"] or (1.0, 1.0, 1.0)
  out = generate.write_volumes(args.out, volumes, spacing, names=info["attributes"], attributes=values,
                               mask=mask, overwrite=args.overwrite,
                               extra_json={generate.SAFEGUARD_FILENAME: report} if report else None,
                               descrip=generate.synthetic_descrip(args.workdir))
  from jaxldm.infer.pictures import save_mid_slices
  if len(volumes):
    save_mid_slices(volumes[:32].clip(-1, 1), out / "grid.png")
  print(f"wrote {len(volumes)} volumes {tuple(volumes.shape[1:])} to {out} ({args.method}, {steps} steps, "
        f"guidance {guidance:g})")
  if report:
    print(f"safeguard ({report['metric']}, threshold {report['threshold']:.4g} = {report['threshold_source']}): "
          f"released {report['released']} of {report['requested']} requested; rejected {report['rejected']} of "
          f"{report['candidates']} candidates in {report['rounds']} round(s); record in {out / generate.SAFEGUARD_FILENAME}")
    if not report["complete"]:
      print(f"jaxldm: warning: only {report['released']} of {report['requested']} samples passed the safeguard "
            f"in {report['rounds']} rounds (--safeguard-max-rounds); raise it or lower the threshold",
            file=sys.stderr)
      return 1
  return 0


# ---------------------------------------------------------------------------------------------
# privacy
# ---------------------------------------------------------------------------------------------
def _sampling(args) -> tuple[float, int]:
  """q and steps from --sampling-rate/--steps or --batch-size/--dataset-size/--epochs."""
  q = args.sampling_rate
  if q is None:
    if not (args.batch_size and args.dataset_size):
      raise ConfigError("give --sampling-rate, or --batch-size and --dataset-size (q = batch / N)")
    q = args.batch_size / args.dataset_size
  steps = args.steps
  if steps is not None and args.epochs is not None:
    raise ConfigError("give --steps or --epochs, not both")
  if steps is None:
    if args.epochs is None:
      raise ConfigError("give --steps, or --epochs (steps = epochs / q)")
    steps = int(round(args.epochs / q))
  return q, steps


def _accountants(name: str) -> list[str]:
  return ["rdp", "pld"] if name == "both" else [name]


# The accountant's ValueErrors name its Python arguments; a user typed these flags.
_PRIVACY_FLAGS = (("target_epsilon", "--target-epsilon"), ("target epsilon", "--target-epsilon"),
                  ("noise_multiplier", "--noise-multiplier"), ("noise multiplier", "--noise-multiplier"),
                  ("sampling_rate", "--sampling-rate"), ("delta", "--delta"), ("steps", "--steps"))


def _check_delta(args) -> None:
  """--delta first: a bad delta must not surface as a target-epsilon or noise problem."""
  if not 0.0 < args.delta < 1.0:
    raise ConfigError(f"--delta {args.delta:g}: delta must be in (0, 1), e.g. --delta 1e-5 (below 1 / dataset size)")


def _privacy_error(error: ValueError, args) -> ConfigError:
  """The accountant's message, prefixed with the flag (and value) it is about."""
  text = str(error)
  for word, flag in _PRIVACY_FLAGS:
    if text.startswith(word):
      if flag == "--sampling-rate" and args.sampling_rate is None:
        flag = "--batch-size/--dataset-size"
      elif flag == "--steps" and args.steps is None:
        flag = "--epochs"
      return ConfigError(f"{flag}: {text}")
  return ConfigError(text)


def cmd_privacy_epsilon(args) -> int:
  from jaxldm.privacy import accounting

  _check_delta(args)
  q, steps = _sampling(args)
  for acc in _accountants(args.accountant):
    try:
      eps = accounting.epsilon(noise_multiplier=args.noise_multiplier, sampling_rate=q, steps=steps,
                               delta=args.delta, accountant=acc)
    except ValueError as e:
      raise _privacy_error(e, args) from e
    print(f"epsilon = {eps:.4f}  ({acc.upper()}; sigma {args.noise_multiplier:g}, q {q:.6g}, "
          f"{steps} steps, delta {args.delta:g})")
  return 0


def cmd_privacy_ledger(args) -> int:
  """A DP run's ledger: its mechanism, steps, epsilon, pinned settings and the composed epsilon."""
  import pathlib

  from jaxldm.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

  path = pathlib.Path(args.workdir) / LEDGER_FILENAME
  if not path.is_file():
    raise ConfigError(f"--workdir {args.workdir}: no {LEDGER_FILENAME} there (not a DP run's workdir)")
  try:
    ledger = PrivacyLedger.load(str(path))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  eps = ledger.epsilon()
  print(f"{path}: {ledger.steps} mechanism steps, sigma {ledger.noise_multiplier:.4f}, q {ledger.sampling_rate:.4g}, "
        f"C {ledger.l2_clip_norm:g}, delta {ledger.delta:g}, {ledger.accountant.upper()}: epsilon {eps:.4f}"
        + (f" (target {ledger.target_epsilon:g})" if ledger.target_epsilon else ""))
  print(f"noise seed: {ledger.noise_seed_provenance}")
  for key, value in sorted(ledger.pinned.items()):
    print(f"pinned {key} = {value}")
  if ledger.upstream:
    print("stages on the same private data (composed by dp-accounting):")
    for st in ledger.upstream:
      print(f"  {st['stage']:<20} {st['workdir']}: {st['steps']} steps, sigma {st['noise_multiplier']:.4f}, "
            f"q {st['sampling_rate']:.4g}: epsilon {st['epsilon']:.4f}")
    print(f"  {'this run':<20} epsilon {eps:.4f}")
    print(f"composed epsilon {ledger.composed_epsilon():.4f} at delta {ledger.delta:g}")
  else:
    print("no other DP stage on the same private data: this run's epsilon is the pipeline's")
  return 0


def cmd_privacy_calibrate(args) -> int:
  from jaxldm.privacy import accounting

  _check_delta(args)
  q, steps = _sampling(args)
  for acc in _accountants(args.accountant):
    try:
      sigma = accounting.calibrate_noise_multiplier(target_epsilon=args.target_epsilon, sampling_rate=q,
                                                    steps=steps, delta=args.delta, accountant=acc)
      eps = accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=args.delta,
                               accountant=acc)
    except ValueError as e:
      raise _privacy_error(e, args) from e
    print(f"noise multiplier = {sigma:.4f}  ({acc.upper()}; gives epsilon {eps:.4f} <= {args.target_epsilon:g} "
          f"at q {q:.6g}, {steps} steps, delta {args.delta:g})")
  return 0


def cmd_privacy_audit(args) -> int:
  import jax

  from jaxldm.privacy import audit, audit_engines

  if args.devices > len(jax.devices()):
    raise ConfigError(f"--devices {args.devices}: only {len(jax.devices())} available (on CPU, set "
                      "XLA_FLAGS=--xla_force_host_platform_device_count=4 for 4)")
  try:
    engine = audit_engines.get(args.engine)
    result = audit.audit_private_step(
        engine, noise_multiplier=args.noise_multiplier, l2_clip_norm=args.clip_norm,
        expected_batch_size=args.batch_size, sampling_rate=args.sampling_rate, per_layer=args.per_layer,
        microbatch_size=args.microbatch_size, k=args.k, num_devices=args.devices, trials=args.trials,
        eps_trials=args.eps_trials, delta=args.delta, confidence=args.confidence, tolerance=args.tolerance,
        noise_scale=args.noise_scale, seed=args.seed, microbatch_loop=args.microbatch_loop)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  r = result
  print(f"audit of {engine.description}: sigma {r.noise_multiplier:g}"
        f"{f' (noise actually scaled by {args.noise_scale:g})' if args.noise_scale != 1 else ''}, "
        f"C {r.l2_clip_norm:g}, E = q N = {r.expected_batch_size:g} (q {r.sampling_rate:.4g}, N {r.dataset_size}), "
        f"{'per-layer' if r.per_layer else 'flat'} clipping, microbatch {r.microbatch_size}, K {r.k}, "
        f"{r.num_devices} device(s), padded batch {r.padded_batch_size}; {r.trials} steps x 2 (noise, "
        f"sensitivity), {r.eps_trials or 'no'} steps (epsilon bound), delta {r.delta:g}")
  print(r.table())
  if r.passed:
    print(f"PASS: within {r.tolerance:.0%} of the claim ({r.seconds:.1f} s)")
    return 0
  print(f"FAIL ({r.seconds:.1f} s):")
  for reason in r.reasons:
    print(f"  - {reason}")
  return 1


def _rero_mechanism(args) -> tuple[float, float, int, float, str]:
  """(sigma, q, steps, delta, source): from the run's privacy ledger or from the flags."""
  from jaxldm.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

  if args.workdir is None:
    if args.noise_multiplier is None:
      raise ConfigError("give --noise-multiplier (and --sampling-rate, --steps), or --workdir RUN")
    q, steps = _sampling(args)
    return args.noise_multiplier, q, steps, 1e-5 if args.delta is None else args.delta, "flags"
  given = [flag for flag, value in (("--noise-multiplier", args.noise_multiplier),
                                    ("--sampling-rate", args.sampling_rate), ("--batch-size", args.batch_size),
                                    ("--dataset-size", args.dataset_size), ("--steps", args.steps),
                                    ("--epochs", args.epochs), ("--delta", args.delta)) if value is not None]
  if given:
    raise ConfigError(f"{', '.join(given)}: --workdir reads sigma, q, steps and delta from the run's "
                      f"{LEDGER_FILENAME}; drop these flags or drop --workdir")
  path = pathlib.Path(args.workdir) / LEDGER_FILENAME
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: --workdir must be a DP training run (one trained with a DP "
                            "config writes a privacy ledger)")
  try:
    ledger = PrivacyLedger.load(str(path))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return ledger.noise_multiplier, ledger.sampling_rate, ledger.steps, ledger.delta, str(path)


def cmd_privacy_rero(args) -> int:
  from jaxldm.privacy import reconstruction

  sigma, q, steps, delta, source = _rero_mechanism(args)
  try:
    summary = reconstruction.rero_summary(noise_multiplier=sigma, sampling_rate=q, steps=steps,
                                          kappas=args.kappa, method=args.method, delta=delta)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  grid = summary["value_discretization_interval"]
  method = {"pld": f"PLD, loss grid {grid:.2g}" if grid else "PLD",
            "gdp": "GDP" + ("" if summary["mu_is_exact"] else " CLT approximation"),
            "exact": "exact closed form"}[args.method]
  print(f"reconstruction-risk bound ({method}) for sigma {sigma:g}, q {q:.6g}, {steps} steps "
        f"[{source}]:")
  mu_note = "exact" if summary["mu_is_exact"] else "CLT"
  for kappa, bound, gdp in zip(summary["kappas"], summary["bounds"], summary["gdp_bounds"]):
    print(f"  prior success kappa {kappa:<8g} -> attack success <= {bound:.4f}   (GDP cross-check "
          f"{gdp:.4f}, mu {summary['mu']:.4g} {mu_note})")
  print(f"epsilon = {summary['epsilon']:.4f} at delta {delta:g} (PLD accountant)")
  if args.plot:
    sigmas = sorted({*reconstruction.DEFAULT_CURVE_SIGMAS, sigma} - {0.0})
    curve = reconstruction.rero_curve(sampling_rate=q, steps=steps, delta=delta, kappas=args.kappa,
                                      noise_multipliers=sigmas, method=args.method)
    reconstruction.plot_rero_curve(curve, args.plot, mark_epsilon=summary["epsilon"])
    print(f"wrote {args.plot}: bound vs epsilon ({len(curve['epsilons'])} noise multipliers, q and steps "
          "fixed)")
  return 0


# ---------------------------------------------------------------------------------------------
# config, demo
# ---------------------------------------------------------------------------------------------
def _conv_route_argument(p) -> None:
  """--conv-weight-grad, as `bench grads` and `bench profile` take it (applied by `_set_conv_route`)."""
  p.add_argument("--conv-weight-grad", choices=("auto", "slices", "taps", "native"),
                 help="convolution route (default auto: slices on CPU, native elsewhere; see "
                      "jaxldm/models/conv.py)")


def _set_conv_route(args) -> None:
  """The convolution route --conv-weight-grad names, for every model traced after this call."""
  if args.conv_weight_grad:
    from jaxldm.models import conv
    conv.set_weight_grad(args.conv_weight_grad)


def cmd_bench_grads(args, overrides) -> int:
  from rich.console import Console

  from jaxldm.bench import grads, report

  console = Console(stderr=True)
  target = grads.build_target(args.model, args.config, overrides)
  _set_conv_route(args)
  with console.status("benchmarking") as status:
    records = grads.run(target, batches=args.batch, modes=args.modes, microbatch=args.microbatch,
                        repeats=args.repeats, warmup=args.warmup,
                        progress=lambda msg: status.update(f"benchmarking: {msg}"))
  report.console().print(report.table(records, title=f"{args.model} {args.config} on {records[0]['device_kind']}"))
  if args.json:
    report.save(args.json, records)
  png = args.png or (str(pathlib.Path(args.json).with_suffix(".png")) if args.json else None)
  if png:
    report.plot(records, png)
  return 0


def cmd_bench_convs(args, overrides) -> int:
  from rich.console import Console

  from jaxldm.bench import convs, grads, report

  console = Console(stderr=True)
  convs.check_variants(args.variants)  # Before the model is built.
  target = grads.build_target(args.model, args.config, overrides)
  with console.status("timing convolutions") as status:
    records = convs.run(target, args.batch, variants=args.variants, repeats=args.repeats, warmup=args.warmup,
                        max_layers=args.max_layers, progress=lambda msg: status.update(f"timing: {msg}"))
  device = records[0]["device_kind"] if records else "this device (no convolutions found)"
  report.console().print(convs.table(records, title=f"{args.model} {args.config}, batch {args.batch}, on {device}"))
  if args.json:
    report.save(args.json, records)
  return 0


def _model_arguments(p) -> None:
  """--model, --config and one --batch, as `bench convs` and `bench profile` take them."""
  p.add_argument("--model", choices=("unet", "autoencoder"), required=True, help="which network")
  p.add_argument("--config", required=True, help="its training config[:variant], e.g. ldm:tiny or autoencoder:paper")
  p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")


def cmd_bench_profile(args, overrides) -> int:
  from rich.console import Console

  from jaxldm.bench import grads, profile, report

  console = Console(stderr=True)
  profile.check(args.mode, args.calls)  # Before the model is built.
  target = grads.build_target(args.model, args.config, overrides)
  _set_conv_route(args)
  with console.status(f"profiling {args.mode} at batch {args.batch}"):
    result = profile.profile(target, args.batch, args.mode, calls=args.calls, microbatch=args.microbatch,
                             trace_dir=args.trace_dir)
  result["config"] = args.config
  for table in profile.tables(result, top=args.top):
    report.console().print(table)
  if args.json:
    report.save_json(args.json, result)
  return 0


def cmd_bench_compare(args, overrides) -> int:
  from jaxldm.bench import compare, report

  if args.from_files or args.files:
    files = args.from_files or args.files
    if len(files) != 2 or overrides or args.model or args.config:
      raise ConfigError("bench compare: give two record files (--from-files A B), or --model and --config to run both")
    a, b = files
    rows = report.compare(report.load(a), report.load(b))
    if not rows:
      print(f"{a} and {b} share no (model, batch) pair", file=sys.stderr)
      return 1
    report.console().print(report.compare_table(rows, pathlib.Path(a).stem, pathlib.Path(b).stem))
    return 0
  if not (args.model and args.config):
    raise ConfigError("bench compare: --model and --config are required (or --from-files A B)")
  compare.load_twin()  # Missing torch/opacus: one line, before anything is measured.
  from rich.console import Console
  with Console(stderr=True).status("benchmarking") as status:
    result = compare.run(args.model, args.config, overrides, batches=args.batch, modes=args.modes,
                         microbatch=args.microbatch, repeats=args.repeats, warmup=args.warmup,
                         device=args.device, threads=args.threads, rounds=args.rounds,
                         progress=lambda msg: status.update(f"benchmarking: {msg}"))
  con = report.console()
  if args.rounds > 1:
    con.print(compare.rounds_table(result["rounds"], title=f"{args.model} {args.config}: ratios per round"))
  else:
    con.print(report.table(result["jaxldm"], title=f"jaxldm: {args.model} {args.config}"))
    con.print(report.table(result["pytorch"], title=f"PyTorch/Opacus twin on {result['pytorch'][0]['device_kind']}"))
  con.print(compare.ratio_table(result["ratios"], title=f"{args.model} {args.config}: jaxldm vs PyTorch/Opacus"))
  if args.json:
    report.save_json(args.json, result)
  return 0


def cmd_bench_trainer(args, overrides) -> int:
  from rich.console import Console

  from jaxldm.bench import report, trainer

  with Console(stderr=True).status("benchmarking") as status:
    record = trainer.run(args.config, overrides, steps=args.steps, warmup=args.warmup, examples=args.examples,
                         sigma=args.sigma, same_k=not args.no_same_k,
                         progress=lambda msg: status.update(f"benchmarking: {msg}"))
  report.console().print(trainer.table(record))
  if args.json:
    report.save_json(args.json, record)
  return 0


def cmd_bench_host(args) -> int:
  import os
  import platform

  import jax

  from jaxldm import hostmem
  from jaxldm.bench import grads
  from jaxldm.models import conv

  devices = jax.devices()
  glibc = hostmem.glibc_version()
  rows = [("cpu", f"{grads.host_cpu()}, {os.cpu_count()} cores"),
          ("jax", f"{jax.__version__}, backend {jax.default_backend()}, {len(devices)} x {devices[0].device_kind}"),
          ("conv route", conv.resolved_weight_grad()),
          ("C library", f"glibc {'.'.join(map(str, glibc))}" if glibc else (platform.libc_ver()[0] or "not glibc")),
          ("huge pages", hostmem.status())]
  for name, value in rows:
    print(f"{name:11s} {value}")
  return 0


def cmd_bench_gpu_check(args) -> int:
  import os
  # Before JAX touches the GPU: grow memory as needed, so the Opacus twin finds room afterwards.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from rich.console import Console

  from jaxldm.bench import gpu_check

  size = "tiny" if args.tiny else "paper"
  out = args.out or ("benchmarks/gpu" if size == "paper" else None)
  if out is None:
    raise ConfigError("bench gpu-check --tiny: give --out DIR (the tiny run writes there, not into benchmarks/)")
  console = Console(stderr=True)
  summary = gpu_check.run(out, size=size, models=args.models, batches=args.batch, dtypes=args.dtypes,
                          convs=args.conv, modes=args.modes, repeats=args.repeats, warmup=args.warmup,
                          budget_s=args.budget_s, opacus=not args.no_opacus, results=args.results,
                          compile_workers=args.compile_workers, conv_layers=args.convs,
                          progress=lambda msg: console.print(f"[dim]gpu-check:[/] {msg}"))
  print(gpu_check.rows_markdown(summary))
  bad = sum(r["status"] != "ok" for r in summary["jaxldm"])
  print(f"wrote {summary['files']['jaxldm']} and rows in {summary['files']['results']} "
        f"({len(summary['jaxldm']) - bad} ok, {bad} oom/error/skipped; {summary['wall_s']:.0f} s)")
  if summary["abandoned_compiles"] and args.is_command:
    # Python would join the compile threads at exit; XLA cannot cancel them. Everything is written.
    print(f"{summary['abandoned_compiles']} compile(s) still running at the budget's end: exiting without "
          "waiting for them")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
  return 0


def cmd_evaluate(args) -> int:
  from rich.console import Console

  from jaxldm.eval import evaluate

  opts = evaluate.Options(n=args.n, features=args.features, feature_weights=args.feature_weights,
                          samples=args.samples, train=args.train, seed=args.seed, guidance=args.guidance,
                          steps=args.steps, batch_size=args.batch_size, regressor=args.regressor,
                          training_images=not args.no_training_images)
  out = args.out or str(pathlib.Path(args.workdir) / "eval")
  console = Console(stderr=True)
  with console.status("evaluating") as status:
    report = evaluate.evaluate(args.workdir, args.real, out, opts,
                               status=lambda msg: status.update(f"evaluating: {msg}"))
  print(evaluate.summary(report))
  print(f"wrote {pathlib.Path(out) / evaluate.REPORT_MD} and {evaluate.REPORT_JSON}")
  return 0


def cmd_ablate(args, overrides) -> int:
  from jaxldm import ablate

  result = ablate.ablate(load_config(args.config, overrides), args.workdir)
  print(f"{len(result['rows'])} runs in {result['csv']} ({result['trained']} trained now); plot {result['png']}")
  return 0


def cmd_config_show(args, overrides) -> int:
  from jaxldm.config import to_dict

  config = load_config(args.config, overrides)
  print(json.dumps(to_dict(config), indent=2))
  return 0


def cmd_demo(args) -> int:
  from jaxldm import demo
  from jaxldm.eval import evaluate

  report = demo.run(args.out, args.size, from_scratch=args.from_scratch)
  print(evaluate.summary(report))
  print(f"report: {pathlib.Path(args.out) / 'report.md'} (+ report.json and figures)")
  return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def _add_size_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--size", choices=("tiny", "default", "paper"), default="default",
                 help="preset shape and spacing: tiny 6x32x32 @ 20x3.6x3.6 mm; default 12x64x64 @ "
                      "10x1.8x1.8 mm (UK Biobank SAX); paper 13x96x96 @ 10x1.8x1.8 mm")
  p.add_argument("--shape", type=_ints, help="volume shape D,H,W (overrides --size)")
  p.add_argument("--spacing", type=_floats, help="voxel spacing dz,dy,dx in mm (overrides --size)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxldm",
      description="Differentially private 3D latent diffusion models for medical volumes.",
      epilog="Config overrides: --config.a.b=value after a --config FILE[:variant].")
  parser.add_argument("--version", action="version", version=f"jaxldm {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")

  data = sub.add_parser("data", help="NIfTI datasets and the phantom benchmark",
                        description="NIfTI datasets and the phantom benchmark.")
  data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
  data.set_defaults(help_parser=data)

  p = data_sub.add_parser(
      "phantoms", help="write a procedural cardiac phantom dataset with ground truth",
      description="Write procedural 3D cardiac short-axis phantoms (.nii.gz) plus attributes.csv "
                  "with per-subject ground truth (LV/RV volumes, EF, wall thickness, phase, ...). "
                  "Deterministic for a seed.")
  p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  p.add_argument("--n", type=int, default=64, help="number of volumes (default 64)")
  p.add_argument("--domain", choices=("public", "private"), default="private",
                 help="public: ACDC-like cohort with pathology and other contrast; private: "
                      "UK-Biobank-like cohort (default)")
  p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  _add_size_args(p)
  p.add_argument("--dtype", choices=("int16", "float32"), default="int16",
                 help="stored voxel type; int16 uses scl_slope like scanner output (default)")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier phantom dataset in --out")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=cmd_data_phantoms)

  p = data_sub.add_parser(
      "inspect", help="summarise a NIfTI directory",
      description="Count, shapes, voxel spacings, orientations, intensity ranges, attribute "
                  "coverage and distributions of a directory of .nii/.nii.gz volumes. Exits 1 "
                  "if any file or CSV row has a problem (all are listed).")
  p.add_argument("dir", help="directory of NIfTI volumes")
  p.add_argument("--csv", help="attribute CSV keyed by subject_id (default DIR/attributes.csv if present)")
  p.add_argument("--json", help="also write the report as JSON to this file")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=cmd_data_inspect)

  p = data_sub.add_parser(
      "prepare", help="preprocess a dataset into its cache, as a config describes it",
      description="Load, reorient, resample, crop/pad and normalise every volume as the config's "
                  "`data` group says, fill the cache and print what the model will see. Every volume "
                  "that cannot be prepared is listed; then it exits 2, unless --exclude-bad FILE: the bad "
                  "volumes' subject ids go to FILE and the rest is prepared; train on that set with "
                  "--config.data.exclude=FILE. The attribute CSV is read as `jaxldm data inspect` reads it.")
  p.add_argument("--config", required=True,
                 help="preset NAME[:variant] (e.g. data:tiny) or config file PATH.py[:variant]")
  p.add_argument("--exclude-bad", metavar="FILE",
                 help="write the subject ids of volumes that cannot be prepared to FILE (with those already in "
                      "data.exclude) and prepare the rest; use it as --config.data.exclude=FILE")
  p.set_defaults(func=cmd_data_prepare, takes_overrides=True)

  p = sub.add_parser(
      "train", help="train a stage (autoencoder, LDM) as a config says",
      description="Train the stage named by the config's `trainer` field into WORKDIR. Resumes "
                  "from the latest checkpoint in WORKDIR automatically.")
  p.add_argument("--config", required=True,
                 help="preset NAME[:variant] (e.g. autoencoder:tiny, ldm_dp:tiny) or config file PATH.py[:variant]")
  p.add_argument("--workdir", required=True, help="run directory: config, checkpoints, metrics, samples")
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="multi-host: address of process 0's coordinator (or JAX_COORDINATOR_ADDRESS); "
                      "'auto' = detected on TPU pods, SLURM, Open MPI")
  p.add_argument("--num-processes", type=int, metavar="N", help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
  p.add_argument("--process-id", type=int, metavar="I", help="multi-host: this process, 0..N-1 (or JAX_PROCESS_ID)")
  p.set_defaults(func=cmd_train, takes_overrides=True)

  p = sub.add_parser(
      "sample", help="sample volumes from a trained LDM to NIfTI",
      description="Draw volumes from the LDM in WORKDIR (EMA weights), decode them with its "
                  "autoencoder and write DIR/sample-XXXXX.nii.gz plus the conditioning used in "
                  "DIR/attributes.csv. Attributes are in natural units; unspecified ones are "
                  "masked (unconditional for them). Each file's NIfTI descrip says 'jaxldm synthetic; "
                  "model NAME; epsilon E' (or non-private).")
  p.add_argument("--workdir", required=True, help="LDM run directory")
  p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  p.add_argument("--n", type=int, default=8, help="number of volumes (default 8)")
  p.add_argument("--attributes", "--attributes-csv", dest="attributes_csv", metavar="CSV",
                 help="CSV with subject_id + attribute columns: one row per sample (cycled)")
  p.add_argument("--attr", "--attribute", dest="attribute", action="append", metavar="NAME=VALUE",
                 help="condition every sample on this value (repeatable), e.g. --attr lv_edv_ml=150 --attr sex=1; "
                      "a category name (--attr sex=F) where the run's config has data.categories. Values more than "
                      "3 std from the training mean get a warning")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale: 1 conditional, 0 unconditional, >1 stronger "
                      "(default: the run's sampling.guidance_scale)")
  p.add_argument("--sampler", "--method", dest="method", choices=("ddim", "ddpm"), default="ddim",
                 help="sampler (default ddim)")
  p.add_argument("--steps", type=int, default=None,
                 help="DDIM steps (ddpm uses all T; default: the run's sampling.num_steps)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per sampler call (default 8)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
  g = p.add_argument_group(
      "release safeguard (Shi et al. 2023)",
      "--safeguard writes only samples whose distance to EVERY training volume exceeds a threshold, redrawing "
      "rejected ones in rounds; DIR/safeguard.json records threshold, metric and counts. Exit code 1 if fewer "
      "than --n passed. A filter, not a DP guarantee: the threshold and the choice depend on training data.")
  g.add_argument("--safeguard", action="store_true", help="apply the safeguard")
  g.add_argument("--safeguard-data", metavar="DIR",
                 help="training volumes, preprocessed as the run's config.json says (default: its data.root)")
  g.add_argument("--safeguard-metric", choices=("rmse", "embedding"), default="rmse",
                 help="rmse: voxel RMSE in training intensity units; embedding: 1 - Pearson r of "
                      "--safeguard-features embeddings (default rmse)")
  t = g.add_mutually_exclusive_group()
  t.add_argument("--safeguard-threshold", type=float, metavar="X", help="release only samples at distance > X")
  t.add_argument("--safeguard-percentile", type=float, metavar="P",
                 help="threshold = the P-th percentile of the training set's own nearest-neighbour distances "
                      "(each training volume to its closest other one); the default, with P = 5")
  g.add_argument("--safeguard-features", default="ssl3d", help="feature extractor for the embedding metric (default ssl3d)")
  g.add_argument("--safeguard-weights", metavar="PATH", help="its weights / trained workdir (embedding metric)")
  g.add_argument("--safeguard-max-rounds", type=int, default=5, help="sampling rounds before giving up (default 5)")
  p.set_defaults(func=cmd_sample)

  privacy = sub.add_parser("privacy", help="DP accounting, calibration and auditing",
                           description="DP accounting, noise calibration and an empirical audit.")
  privacy.set_defaults(help_parser=privacy)
  privacy_sub = privacy.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")

  def add_sampling_args(p):
    p.add_argument("--sampling-rate", type=float, help="Poisson sampling rate q (or --batch-size/--dataset-size)")
    p.add_argument("--batch-size", type=float, help="expected batch size (with --dataset-size: q = batch / N)")
    p.add_argument("--dataset-size", type=int, help="number of training examples N")
    p.add_argument("--steps", type=int, help="training steps (or --epochs)")
    p.add_argument("--epochs", type=float, help="epochs (steps = epochs / q)")
    p.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    p.add_argument("--accountant", choices=("pld", "rdp", "both"), default="pld", help="accountant (default pld)")

  p = privacy_sub.add_parser(
      "epsilon", help="epsilon of a DP-SGD run",
      description="Epsilon of Poisson-subsampled Gaussian DP-SGD, via dp-accounting. Example (Daum et "
                  "al.): --noise-multiplier 1.1 --batch-size 256 --dataset-size 60000 --steps 14062")
  p.add_argument("--noise-multiplier", type=float, required=True, help="sigma (noise std / clip norm)")
  add_sampling_args(p)
  p.set_defaults(func=cmd_privacy_epsilon)

  p = privacy_sub.add_parser(
      "ledger", help="a DP run's ledger: epsilon, pinned settings, composed epsilon",
      description="Reads WORKDIR/privacy_ledger.json: the mechanism, the steps counted, epsilon, the settings and "
                  "data fingerprint it pins, and the epsilon composed with earlier DP stages on the same "
                  "private data. Example: jaxldm privacy ledger --workdir runs/demo/ldm_dp")
  p.add_argument("--workdir", required=True, help="the DP run's workdir")
  p.set_defaults(func=cmd_privacy_ledger)

  p = privacy_sub.add_parser("calibrate", help="noise multiplier for a target epsilon",
                             description="The smallest noise multiplier whose epsilon is <= the target.")
  p.add_argument("--target-epsilon", type=float, required=True, help="target epsilon")
  add_sampling_args(p)
  p.set_defaults(func=cmd_privacy_calibrate)

  p = privacy_sub.add_parser(
      "audit", help="check the trainers' DP step against its claim (noise, sensitivity, epsilon)",
      description="Runs the trainers' own private step (Poisson batcher, padding, mask, microbatching, "
                  "batch sharded over the devices, flat or per-layer clipping, dp.private_gradient) on a "
                  "linear model with a canary example whose gradient has norm >> C along a known direction "
                  "u, and measures from the scores <g, u>: (1) the noise std x E / (sigma C), which must be "
                  "1, (2) the shift a sampled canary causes x E / C, which must be 1 (and 0 on steps that "
                  "did not sample it), each within --tolerance, and (3) an empirical epsilon lower bound "
                  "(Clopper-Pearson, canary deterministically in or out) that must not exceed the "
                  "accountant's epsilon of one step at q = 1. Prints a table; exits 1 on any failure. "
                  "About 10-30 s on CPU. --noise-scale 0.5 simulates a bug (half the noise).",
      epilog="E = expected batch size q N; the dataset has N = round(E / q) examples. On CPU, "
             "XLA_FLAGS=--xla_force_host_platform_device_count=4 gives 4 devices. Developers: "
             "--engine NAME audits a deliberately broken engine instead (see "
             "jaxldm/privacy/audit_engines.py), e.g. noise_per_device, which the audit must catch.")
  p.add_argument("--noise-multiplier", type=float, default=1.0, help="claimed sigma (default 1)")
  p.add_argument("--clip-norm", type=float, default=1.0, help="clip norm C (default 1)")
  p.add_argument("--batch-size", type=float, default=4.0, help="expected batch size E = q N (default 4)")
  p.add_argument("--sampling-rate", type=float, default=0.25, help="Poisson sampling rate q (default 0.25)")
  p.add_argument("--per-layer", action="store_true", help="per-layer clipping (dp.per_layer)")
  p.add_argument("--microbatch-size", type=int, default=2, help="dp.microbatch_size (default 2)")
  p.add_argument("--k", type=int, default=1, help="noise multiplicity K: random draws the loss averages (default 1)")
  p.add_argument("--microbatch-loop", choices=("traced", "accumulate", "host"), default="traced",
                 help="dp.microbatch_loop audited: traced (the loop accelerators run; default), accumulate "
                      "(what CPU trainers run: microbatch sums added, then one noise draw) or host (the batch "
                      "vmapped whole)")
  p.add_argument("--devices", type=int, default=0, help="devices the batch is sharded over (default 0 = all)")
  p.add_argument("--trials", type=int, default=4000,
                 help="steps for the noise and sensitivity checks (default 4000: ~1%% standard error)")
  p.add_argument("--eps-trials", type=int, default=100_000,
                 help="steps for the epsilon lower bound (default 100000; 0 skips it)")
  p.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
  p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
  p.add_argument("--tolerance", type=float, default=0.10,
                 help="largest relative deviation of the measured noise and sensitivity (default 0.1)")
  p.add_argument("--noise-scale", type=float, default=1.0, help="scale the noise actually added (default 1)")
  p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
  p.add_argument("--engine", default="trainer", help=argparse.SUPPRESS)  # Developers: audit_engines.ENGINES.
  p.set_defaults(func=cmd_privacy_audit)

  p = privacy_sub.add_parser(
      "rero", help="reconstruction-risk bound of a DP-SGD run",
      description="Upper bound on the success probability of any reconstruction attack whose prior "
                  "success is kappa (Hayes et al. 2023), from the trade-off function of T Poisson-"
                  "subsampled Gaussian steps. Methods: pld (rigorous, numeric; default), gdp (GDP "
                  "central-limit approximation; exact for q = 1), exact (closed form, q = 1 only). "
                  "Example: --noise-multiplier 1.1 --sampling-rate 0.00427 --steps 14062 --kappa 0.01, "
                  "or --workdir RUN to read them from the run's privacy_ledger.json.")
  p.add_argument("--workdir", help="DP run: read sigma, q, steps and delta from its privacy_ledger.json")
  p.add_argument("--noise-multiplier", type=float, help="sigma (noise std / clip norm)")
  p.add_argument("--sampling-rate", type=float, help="Poisson sampling rate q (or --batch-size/--dataset-size)")
  p.add_argument("--batch-size", type=float, help="expected batch size (with --dataset-size: q = batch / N)")
  p.add_argument("--dataset-size", type=int, help="number of training examples N")
  p.add_argument("--steps", type=int, help="training steps (or --epochs)")
  p.add_argument("--epochs", type=float, help="epochs (steps = epochs / q)")
  p.add_argument("--delta", type=float, help="delta for the epsilon shown (default 1e-5)")
  p.add_argument("--kappa", type=_floats, default=(1e-3, 1e-2, 1e-1),
                 help="prior success probabilities, comma-separated (default 0.001,0.01,0.1)")
  p.add_argument("--method", choices=("pld", "gdp", "exact"), default="pld", help="bound (default pld)")
  p.add_argument("--plot", metavar="OUT.png",
                 help="also plot the bound against epsilon (sigma varied, q and steps fixed; one line per kappa)")
  p.set_defaults(func=cmd_privacy_rero)

  bench = sub.add_parser("bench", help="per-example gradient throughput benchmarks",
                         description="Benchmarks of the DP-SGD gradient modes.")
  bench.set_defaults(help_parser=bench)
  bench_sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
  p = bench_sub.add_parser(
      "grads", help="time non-private vs per-example (DP) gradients of a model",
      description="Times every gradient mode on the same model, data and keys in one process: compile "
                  "(reported apart), warm-up, then the modes alternate in each repeat and the median "
                  "step time is reported. Writes one JSON record per (mode, batch) and a PNG plot. "
                  "Example: jaxldm bench grads --model unet --config ldm:tiny --batch 8,16 "
                  "--modes nonprivate,vmap --json grads.json")
  p.add_argument("--model", choices=("unet", "autoencoder"), required=True, help="which network")
  p.add_argument("--config", required=True,
                 help="its training config[:variant], e.g. ldm:tiny or autoencoder:paper")
  p.add_argument("--batch", type=_ints, default=(8,), help="batch sizes, comma-separated (default 8)")
  p.add_argument("--modes", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()),
                 default=("nonprivate", "vmap", "vmap_microbatch"),
                 help="comma-separated subset of nonprivate,vmap,vmap_microbatch,loop "
                      "(default nonprivate,vmap,vmap_microbatch)")
  p.add_argument("--microbatch", type=int, default=0, help="microbatch size of vmap_microbatch (default batch/4)")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per mode (default 5; the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling (default 2)")
  _conv_route_argument(p)
  p.add_argument("--json", metavar="OUT.json", help="write the records here (and the plot next to it)")
  p.add_argument("--png", metavar="OUT.png", help="plot path (default: next to --json)")
  p.set_defaults(func=cmd_bench_grads, takes_overrides=True)
  p = bench_sub.add_parser(
      "convs", help="per convolution layer: batched vs per-example (native, slices, taps) backward time",
      description="Collects every convolution of the model's loss (shapes per example, counted once per "
                  "distinct layer) and times each layer's backward work (forward, input and kernel "
                  "gradient) on the same inputs: batched with XLA's convolution and on the CPU routes "
                  "(batched, batched_slices, batched_taps: the non-private step), per example with XLA's "
                  "convolution (native, the GPU/TPU default) and on the CPU routes (slices: 2D convolutions "
                  "over slices and one 2D kernel gradient per example, the CPU default; taps: per-tap GEMM "
                  "kernel gradients); with pytorch in --variants, PyTorch's batched work too (the bench "
                  "extra), layer by layer against jaxldm's. The count-weighted totals say how much of "
                  "the private step's overhead the convolutions explain. Example: jaxldm bench convs "
                  "--model unet --config ldm:paper --batch 8 --json convs.json")
  _model_arguments(p)
  p.add_argument("--variants", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()),
                 default=("batched", "batched_slices", "batched_taps", "native", "slices", "taps"),
                 help="comma-separated subset of batched,batched_slices,batched_taps,native,slices,taps,"
                      "pytorch (default all but pytorch, which needs pip install -e '.[bench]')")
  p.add_argument("--max-layers", type=int, default=0,
                 help="time only the N distinct layers with the most flops x count (default 0: all)")
  p.add_argument("--repeats", type=int, default=10, help="timed repeats (default 10; the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling (default 2)")
  p.add_argument("--json", metavar="OUT.json", help="write the records here")
  p.set_defaults(func=cmd_bench_convs, takes_overrides=True)
  p = bench_sub.add_parser(
      "profile", help="where one gradient step's time goes, operation by operation (XLA profiler)",
      description="Runs one mode's compiled step (the program `bench grads` times) a few times under "
                  "jax.profiler and sums each compiled operation's time per call, joined to its HLO: "
                  "output shape, the JAX operation it came from, and a kind (convolution, matmul, "
                  "reduction, copy, elementwise, control). Prints the totals per kind and the longest "
                  "operations. The sums rank work; they are not a budget (operations overlap on the "
                  "CPU's threads). Example: jaxldm bench profile --model unet --config ldm:tiny "
                  "--batch 8 --mode nonprivate --json profile.json")
  _model_arguments(p)
  p.add_argument("--mode", default="nonprivate", help="one of nonprivate,vmap,vmap_microbatch,loop (default nonprivate)")
  p.add_argument("--microbatch", type=int, default=0, help="microbatch size of vmap_microbatch (default batch/4)")
  p.add_argument("--calls", type=int, default=3, help="profiled calls, also the timed ones (default 3)")
  p.add_argument("--top", type=int, default=25, help="operations listed (default 25; --json keeps all)")
  _conv_route_argument(p)
  p.add_argument("--trace-dir", metavar="DIR", help="keep the profiler's trace here (Perfetto/TensorBoard)")
  p.add_argument("--json", metavar="OUT.json", help="write the summary, every operation included, here")
  p.set_defaults(func=cmd_bench_profile, takes_overrides=True)
  p = bench_sub.add_parser(
      "compare", help="jaxldm vs its PyTorch/Opacus twin, same model and batch, one command",
      description="Runs the PyTorch/Opacus twin (jaxldm/bench/torch_twin.py, in a subprocess) and jaxldm's "
                  "gradient modes on the same model, batch and inputs back to back, and prints the ratios "
                  "Opacus DP / jaxldm DP, jaxldm non-private / PyTorch plain, jaxldm DP / jaxldm non-private "
                  "(fastest DP mode of each). Needs torch and opacus: pip install -e '.[bench]'. "
                  "Example: jaxldm bench compare --model unet --config ldm:tiny --batch 8 "
                  "--json compare.json. With --from-files A B (or two positional files): step-time "
                  "ratios B / A of two saved record files.")
  p.add_argument("files", nargs="*", metavar="FILE", help="two record files (same as --from-files)")
  p.add_argument("--from-files", nargs=2, metavar=("A", "B"),
                 help="compare two saved record files (A e.g. jaxldm's, B scripts/bench_opacus.py's) instead")
  p.add_argument("--model", choices=("unet", "autoencoder"), help="which network")
  p.add_argument("--config", help="its training config[:variant], e.g. ldm:tiny")
  p.add_argument("--batch", type=_ints, default=(8,), help="batch sizes, comma-separated (default 8)")
  p.add_argument("--modes", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()), default=("nonprivate", "vmap"),
                 help="jaxldm modes (default nonprivate,vmap; the twin runs plain, opacus_functorch, opacus_hooks)")
  p.add_argument("--microbatch", type=int, default=0, help="microbatch size of vmap_microbatch (default batch/4)")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per mode (default 5)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (default 2)")
  p.add_argument("--device", default="", help="the twin's torch device (default cuda if torch sees one, else cpu)")
  p.add_argument("--threads", type=int, default=0, help="the twin's torch threads (default all cores)")
  p.add_argument("--rounds", type=int, default=1,
                 help="measure both sides this many times, each in fresh processes, alternating which goes "
                      "first; the table gives the median ratio and its min-max (default 1: the twin in a "
                      "subprocess, jaxldm in this one). Use 3-5 on a shared or noisy CPU, where one process "
                      "can run every step ~25%% slower than the next")
  p.add_argument("--json", metavar="OUT.json", help="write both record lists and the ratios here")
  p.set_defaults(func=cmd_bench_compare, takes_overrides=True)

  p = bench_sub.add_parser(
      "trainer", help="time a DP trainer's own jitted private step (batcher included) vs its non-private step",
      description="Builds the trainer's jitted steps (the LDM's jaxldm.train.ldm.jitted_step or the "
                  "autoencoder's jaxldm.train.autoencoder.jitted_step) and the DP run's Poisson batcher "
                  "(dp.setup in a temporary directory, dp.PrivateRun.step_inputs: sampling, padding, "
                  "microbatches, sharding) on random latents or volumes (no model or data files), times "
                  "the private step and the non-private step at the expected batch size, and reports "
                  "DP step / (K x non-private step), K = diffusion.noise_multiplicity (1 for the "
                  "autoencoder). Examples: jaxldm bench trainer --config ldm_dp:tiny; "
                  "jaxldm bench trainer --config autoencoder_dp:tiny")
  p.add_argument("--config", required=True,
                 help="a DP LDM or autoencoder config[:variant], e.g. ldm_dp:tiny or autoencoder_dp:tiny")
  p.add_argument("--steps", type=int, default=30,
                 help="timed steps of each kind (default 30; means: a Poisson step's time varies with its size)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call (default 2)")
  p.add_argument("--examples", type=int, default=0,
                 help="synthetic training set size N (default max(64, 8 x expected batch)); q = expected batch / N")
  p.add_argument("--sigma", type=float, default=1.0, help="noise multiplier (default 1; the time does not depend on it)")
  p.add_argument("--no-same-k", action="store_true",
                 help="skip the non-private step at the DP config's K (one compile less)")
  p.add_argument("--json", metavar="OUT.json", help="write the record here")
  p.set_defaults(func=cmd_bench_trainer, takes_overrides=True)

  p = bench_sub.add_parser(
      "host", help="what a benchmark on this machine runs on: CPU, JAX devices, conv route, huge pages",
      description="Prints the host facts that decide jaxldm's speed here: the CPU and its cores, JAX's "
                  "version, backend and devices, the convolution route models are traced with, and "
                  "whether XLA:CPU's per-step buffers get transparent huge pages (the `jaxldm` command "
                  "asks for them itself where that helps: jaxldm/hostmem.py; JAXLDM_NO_HUGE_PAGES=1 "
                  "turns it off). Example: jaxldm bench host")
  p.set_defaults(func=cmd_bench_host)
  p = bench_sub.add_parser(
      "gpu-check", help="one-call GPU check: paper models, batch 8/32, fp32/bf16, native/taps, memory, TFLOP/s",
      description="The paper-size autoencoder and UNet at batch 8 and 32, float32 and bfloat16, conv kernel "
                  "gradient native and taps, modes nonprivate/vmap/vmap_microbatch: step times, XLA memory "
                  "plan, device peak memory, achieved TFLOP/s; first the PyTorch/Opacus twin on the same "
                  "device (a fifth of the budget at most). Out-of-memory configurations are recorded, not fatal; a time budget bounds the "
                  "run (--budget-s, default 450 s: paper-size programs compile in 50-210 s each on an H200, so "
                  "the most wanted configurations run first and the rest are recorded as skipped). Writes <out>/<device>_<size>_*.json and appends rows to "
                  "the results file under '## GPU check'. --tiny: the same run on small models (CPU). "
                  "Example: bash scripts/gpu_check.sh, or jaxldm bench gpu-check --tiny --out /tmp/gc")
  p.add_argument("--tiny", action="store_true", help="small :tiny models, batch 2,4, 2 repeats (a CPU run)")
  p.add_argument("--out", help="output folder (default benchmarks/gpu; required with --tiny)")
  p.add_argument("--results", help="markdown file the rows go to (default benchmarks/RESULTS.md, "
                                   "with --tiny <out>/RESULTS.md)")
  p.add_argument("--models", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()), default=("unet", "autoencoder"),
                 help="comma-separated (default unet,autoencoder)")
  p.add_argument("--batch", type=_ints, default=None, help="physical batch sizes (default 8,32; --tiny 2,4)")
  p.add_argument("--dtypes", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()), default=("bfloat16", "float32"),
                 help="model.dtype values (default bfloat16,float32)")
  p.add_argument("--conv", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()), default=("native", "taps"),
                 help="conv kernel gradients (default native,taps)")
  p.add_argument("--modes", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()), default=("nonprivate", "vmap", "vmap_microbatch"),
                 help="gradient modes (default nonprivate,vmap,vmap_microbatch)")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --tiny 2)")
  p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 2; --tiny 1)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="time budget in seconds, the twin included (default 450; --tiny none)")
  p.add_argument("--compile-workers", type=int, default=0, help="parallel XLA compiles (default cores/2, at most 8)")
  p.add_argument("--convs", type=int, default=0, metavar="N",
                 help="before the grid, each model's N largest convolution layers batched vs per-example, native and "
                      "taps kernel gradients (jaxldm bench convs; a quarter of the budget at most; default 0: off)")
  p.add_argument("--no-opacus", action="store_true", help="skip the PyTorch/Opacus twin")
  p.set_defaults(func=cmd_bench_gpu_check)

  p = sub.add_parser(
      "evaluate", help="quality, memorization, safeguard, controllability and privacy report of an LDM",
      description="Samples the LDM in WORKDIR (conditioned on the real set's attributes) or reads --samples, "
                  "then computes FID/KID/precision/recall/MS-SSIM against --real, the memorization copy rate "
                  "(Dar et al.), the release safeguard's rejections (Shi et al.), controllability and the "
                  "privacy ledger + ReRo bound; writes OUT/report.json, OUT/report.md and figures. Re-runs "
                  "reuse the samples and the cached real-set features.")
  p.add_argument("--workdir", required=True, help="LDM run directory")
  p.add_argument("--real", required=True, help="held-out REAL volumes (not the training data): FID reference and "
                                              "memorization validation set")
  p.add_argument("--out", help="report directory (default WORKDIR/eval)")
  p.add_argument("--n", type=int, default=64, help="samples to draw (default 64)")
  p.add_argument("--samples", metavar="DIR", help="evaluate these samples (from jaxldm sample) instead of drawing")
  p.add_argument("--train", metavar="DIR", help="training volumes (default: the run's data.root)")
  p.add_argument("--features", choices=("ssl3d", "medicalnet", "slice2d"), default="ssl3d",
                 help="feature extractor (default ssl3d: train it with jaxldm train --config ssl)")
  p.add_argument("--feature-weights", metavar="PATH",
                 help="ssl3d: its workdir (default runs/ssl); medicalnet/slice2d: a PyTorch weight file")
  p.add_argument("--regressor", metavar="WORKDIR", help="attribute regressor run for controllability on real data")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale (default: the run's sampling.guidance_scale, as jaxldm sample)")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
  p.add_argument("--seed", type=int, default=0, help="seed of sampling, bootstraps and KID subsets (default 0)")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per sampler/extractor call (default 8)")
  p.add_argument("--no-training-images", action="store_true",
                 help="leave out the nearest-neighbour figure (it shows training volumes)")
  p.set_defaults(func=cmd_evaluate)

  p = sub.add_parser(
      "ablate", help="DP ablation grid: train, evaluate and tabulate every run (resumable)",
      description="Expands the grid of --config (target epsilon x pretrained x noise multiplicity x clip norm x "
                  "seeds), trains each run with the LDM trainer into WORKDIR/runs/NAME, evaluates it (jaxldm "
                  "evaluate) and writes WORKDIR/ablation.csv (one row per run), WORKDIR/summary.md (mean and 95% CI "
                  "over seeds per setting) and WORKDIR/ablation.png (FID, copy rate, controllability vs epsilon). "
                  "Runs with a report are not redone. Examples: jaxldm ablate --config ablation:tiny "
                  "--workdir runs/ablation; the pretraining study (after make demo): jaxldm ablate --config "
                  "study_pretraining:tiny --workdir runs/study")
  p.add_argument("--config", required=True,
                 help="ablation preset NAME[:variant] (e.g. ablation:tiny, study_pretraining:tiny) or config file "
                      "PATH.py[:variant]")
  p.add_argument("--workdir", required=True, help="sweep directory (runs, CSV, plot, XLA cache)")
  p.set_defaults(func=cmd_ablate, takes_overrides=True)

  p = sub.add_parser("config", help="print a resolved config",
                     description="Print a config after its variant and --config.* overrides.")
  p.add_argument("--config", required=True, help="preset NAME[:variant] or config file PATH.py[:variant]")
  p.set_defaults(func=cmd_config_show, takes_overrides=True)

  p = sub.add_parser(
      "demo", help="run the main job end to end (what make demo runs)",
      description="Phantom benchmark (public, private, held-out) -> the shipped public models (autoencoder, "
                  "contrastive encoder, LDM, trained on public phantoms only: python -m jaxldm.pretrained) -> "
                  "DP finetuning on private data at epsilon 10 (delta 1e-5) -> sampling and evaluation: "
                  "OUT/report.md and report.json, OUT/conditioning_sweep.png, OUT/public_only/ (the public "
                  "model alone). Re-running skips finished stages and resumes an interrupted one from its "
                  "checkpoints.")
  p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
  p.add_argument("--size", choices=("tiny", "default", "paper"), default="tiny",
                 help="tiny (default): 6x32x32 volumes, ~15 min on a 2-core CPU; default: 12x64x64; "
                      "paper: the paper's 13x96x96 geometry and model sizes, for an accelerator")
  p.add_argument("--from-scratch", action="store_true",
                 help="train the public stages (autoencoder, contrastive encoder, LDM pretraining) here instead "
                      "of starting from the shipped public models (sizes without shipped models always do)")
  p.set_defaults(func=cmd_demo)
  return parser


def _quiet_libraries() -> None:
  """dp-accounting's RDP orders and orbax log warnings that are noise to a user (absl WARNING)."""
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)


def _started_as_jaxldm() -> bool:
  """Whether this process is the `jaxldm` command: its console script or `python -m jaxldm.cli`.

  Only then may `main` re-execute the process (a script of the user's that calls `main()` would run
  again from its first line) or a command end it without Python's exit (`args.is_command`)."""
  first = sys.argv[0] if sys.argv else ""
  if not first or first.startswith("-"):
    return False
  path = pathlib.Path(first)
  return path.name == "jaxldm" or path.resolve() == pathlib.Path(__file__).resolve()


def main(argv: Sequence[str] | None = None) -> int:
  is_command = argv is None and _started_as_jaxldm()  # Not `main([...])` called from Python.
  if is_command:  # Huge pages for XLA:CPU's buffers: jaxldm/hostmem.py.
    from jaxldm import hostmem
    hostmem.reexec_with_huge_pages()
  argv = list(sys.argv[1:] if argv is None else argv)
  _quiet_libraries()
  parser = build_parser()
  try:
    overrides, rest = split_override_args(argv)
    args = parser.parse_args(rest)
    args.is_command = is_command
    if not hasattr(args, "func"):  # A command group without its subcommand: show its help.
      (args.help_parser if hasattr(args, "help_parser") else parser).print_help()
      return 2
    if getattr(args, "takes_overrides", False):
      return args.func(args, overrides)
    if overrides:
      raise ConfigError(f"{' '.join(overrides)}: config overrides need a command that takes --config")
    return args.func(args)
  except Exception as e:
    if not isinstance(e, _user_errors()):
      raise
    print(f"jaxldm: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxldm: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
