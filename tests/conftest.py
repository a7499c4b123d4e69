"""Test-session setup, before JAX is imported: several CPU devices for the sharding tests, and a
persistent compilation cache so that identical programs (the same tiny model trained by several
tests) compile once per session.

Meshes: the session has 4 CPU devices, but a trainer's default mesh (`train.num_devices` = 0, "all")
spans ONE of them unless the test is marked `all_devices`. Four virtual devices on a 2-core CPU make
every step four partitions plus collectives: the DP trainer tests ran 1.6x slower on them (measured:
tests/train/test_autoencoder_dp.py 57 s vs 34 s). Sharding is what the marked tests and the tests
that ask for a device count explicitly are about (sharded trainers agree with one device, the audit
on 4 devices, two processes vs one).
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxldm-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")



import pytest  # noqa: E402  (after the environment above, before any test imports JAX)

_ALL_DEVICES_MEANS = {"devices": 1}  # What num_devices = 0 resolves to in the running test.


def _freeze_survivors(phase, info):
  """After each full garbage collection, what survived it is moved out of the collector's view (gc.freeze).

  Why: a test worker's heap grows to ~6 GB of Python objects (JAX's trace and executable caches, the
  trainers' jitted steps), and each of its ~30 full collections walked all of it: 0.55 s each, 37 of the
  45 s the two workers spent collecting garbage (gc callbacks, whole suite). Frozen, a full collection
  walks only what was allocated since the last one: 3.8 s in all, 11.6 s of collecting in total. Cost:
  a reference cycle among frozen objects that dies later is never freed (peak RSS per worker 6.4 / 5.9 GB
  before, 7.1 / 6.0 GB with it).
  """
  if phase == "stop" and info["generation"] == 2:
    import gc

    gc.freeze()


def pytest_configure(config):
  config.addinivalue_line("markers", "all_devices: num_devices = 0 means all 4 test devices (default: 1)")
  import gc

  gc.callbacks.append(_freeze_survivors)


@pytest.fixture(scope="session", autouse=True)
def _one_device_unless_marked():
  """`common.make_mesh(0)` spans one device, or all of them in tests marked `all_devices`."""
  from jaxldm.train import common

  make_mesh = common.make_mesh

  def test_session_mesh(num_devices: int = 0):
    return make_mesh(num_devices or _ALL_DEVICES_MEANS["devices"])

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(common, "make_mesh", test_session_mesh)
    yield


@pytest.fixture(autouse=True)
def _all_devices_when_marked(request):
  marked = request.node.get_closest_marker("all_devices") is not None
  _ALL_DEVICES_MEANS["devices"] = 0 if marked else 1
  yield
  _ALL_DEVICES_MEANS["devices"] = 1


@pytest.fixture
def programs_built():
  """`with programs_built() as built:` lists the programs JAX lowers within the block: one per compiled
  (or cache-loaded) program, including each op run eagerly on shapes it has not run on before."""
  import contextlib

  import jax

  @contextlib.contextmanager
  def counting():
    built = []
    listener = lambda event, duration, **kw: built.append(kw.get("fun_name", "")) if event.endswith(
        "/jaxpr_to_mlir_module_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      yield built
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)

  return counting


@pytest.fixture(scope="session")
def mini_demo(tmp_path_factory):
  """`jaxldm demo` with a miniature plan: phantoms, AE, SSL encoder, LDM, DP LDM, evaluation.

  Built once per test worker and shared by tests/test_demo.py and tests/eval/test_evaluate.py (both
  marked xdist_group(name="pipeline"), so `--dist loadgroup` runs them on one worker and it is built once).
  Returns (out_dir, report, stage messages, plan, overrides).
  """
  from jaxldm import demo

  plan = demo.Plan(n_public=8, n_private=8, n_heldout=6, n_samples=4, autoencoder_steps=2, ssl_steps=1,
                   ldm_steps=2, dp_steps=2, sample_steps=2)
  # One attention block (the middle one: cross-attention to the attributes included), not four.
  small_ldm = {"model.base_channels": 8, "model.context_dim": 8, "model.attention_levels": (), "train.sample_every": 0,
               "train.batch_size": 4}
  overrides = {
      "autoencoder": {"train.sample_every": 0, "train.batch_size": 4},
      "ssl": {"train.batch_size": 8, "train.num_devices": 1},
      "ldm": small_ldm,
      "ldm_dp": {**small_ldm, "dp.expected_batch_size": 4, "dp.microbatch_size": 4},
  }
  out = tmp_path_factory.mktemp("mini_demo")
  messages = []
  # From scratch: the miniature public stages (the shipped models are tests/test_pretrained.py's).
  report = demo.run(out, "tiny", plan=plan, overrides=overrides, say=messages.append, from_scratch=True)
  return out, report, messages, plan, overrides


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Tests of one module that share a module-scoped fixture run on one xdist worker.

  Why: `--dist loadgroup` otherwise spreads a module's tests over both workers, and each worker then
  builds the module's expensive fixtures (a trained autoencoder + LDM, 120 phantoms) again. Runs
  before xdist's own hook, which turns the marker into the `@group` suffix it schedules by.
  """
  for item in items:
    if item.get_closest_marker("xdist_group"):
      continue
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures is None:
      continue
    if any(defs and defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
      item.add_marker(pytest.mark.xdist_group(name=item.nodeid.split("::")[0]))


def pytest_sessionfinish(session, exitstatus):
  """Drops JAX's garbage-collection callback before pytest's exit-time collections.

  Why: pytest collects garbage five times at exit (to report unraisable exceptions); with JAX's
  callback each pass also runs XLA's collector (~3 s per xdist worker), and xdist's shutdown
  interrupt landed inside it, printing a PytestUnraisableExceptionWarning at the end of every run.
  """
  import gc

  gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, "__name__", "") != "_xla_gc_callback"]
