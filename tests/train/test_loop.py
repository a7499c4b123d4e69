"""The training loop every trainer runs (jaxldm.train.loop), on a trivial three-parameter state.

Cadence of logs, samples and checkpoints; a resume ends where an uninterrupted run does; only
process 0 writes the run's files; a private run records its ledger before anything leaves the loop
(and a loop that records after saving is caught), and stops before the budget.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from rich.console import Console

from jaxldm import fitting
from jaxldm.config import ConfigError
from jaxldm.privacy import accounting
from jaxldm.train import common, distributed, dp, loop

EXAMPLES = {"x": (np.arange(24, dtype=np.float32).reshape(8, 3) / 10)}


def _config(**train) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({"seed": 0, "train": {
      "steps": 4, "batch_size": 4, "log_every": 1, "sample_every": 0, "checkpoint_every": 2, "keep_checkpoints": 10}})
  c.train.update(train)
  return c


def _state(name: str = "w") -> fitting.TrainState:
  zeros = lambda: {name: jnp.zeros(3)}
  return fitting.TrainState(step=jnp.array(0, jnp.int32), params=zeros(), opt_state={"m": jnp.zeros(3)},
                           ema_params=zeros())


@jax.jit
def _plain_step(state, batch, key):
  """SGD with momentum toward the batch mean, plus key-dependent jitter: the batch and key matter."""
  g = state.params["w"] - batch["x"].mean(0) + 0.1 * jax.random.normal(key, (3,))
  m = 0.9 * state.opt_state["m"] + g
  w = state.params["w"] - 0.1 * m
  metrics = {"loss": jnp.sum(g ** 2), "grad_norm": jnp.linalg.norm(g), "taken": (state.step + 1).astype(jnp.float32)}
  return state.replace(step=state.step + 1, params={"w": w}, opt_state={"m": m},
                       ema_params=fitting.ema_update(state.ema_params, {"w": w}, 0.5)), metrics


def _run(workdir, config, *, dp_run=None, sample=None, mesh=None, state=None) -> tuple[loop.Run, object]:
  """One run of the loop, as a trainer does it: restore, then train."""
  workdir, _ = common.prepare_workdir(workdir)
  mesh = mesh or common.make_mesh(0)
  run = loop.Run(workdir, config, Console(quiet=True), dp_run=dp_run, sample=sample)
  state = loop.restore(run, _state() if state is None else state, mesh)
  if dp_run is None:
    step = loop.shuffled_step(_plain_step, EXAMPLES, seed=config.seed, batch_size=config.train.batch_size, mesh=mesh)
  else:
    step = _private_step(dp_run, mesh)
  return run, loop.train(run, state, step, description="test")


def _lines(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _saved_params(workdir, step=None):
  ckpt = common.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  params, _ = ckpt.restore_tree("params", step)
  ckpt.close()
  return params["w"]


def test_cadence_of_logs_samples_and_checkpoints(tmp_path):
  sampled = []
  run, state = _run(tmp_path, _config(steps=7, log_every=2, sample_every=3, checkpoint_every=3),
                    sample=lambda state, step: sampled.append((step, int(state.step))))
  assert run.step == 7 and int(state.step) == 7 and not run.stopped_for_budget
  lines = _lines(tmp_path)
  assert [l["step"] for l in lines] == [2, 4, 6, 7]  # Every log_every steps, and the last.
  # Each line holds the means over the steps since the previous line.
  assert [l["taken"] for l in lines] == [1.5, 3.5, 5.5, 7.0]
  assert sampled == [(3, 3), (6, 6), (7, 7)]  # The hook sees the state of the step it is called for.
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  assert list(ckpt.manager.all_steps()) == [3, 6, 7]
  ckpt.close()
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 7
  assert "w" in (tmp_path / "parameters.txt").read_text()


def test_resume_continues_exactly(tmp_path):
  _run(tmp_path / "straight", _config(steps=6, checkpoint_every=2))
  _run(tmp_path / "resumed", _config(steps=3, checkpoint_every=2))  # "Interrupted" after step 3.
  run, _ = _run(tmp_path / "resumed", _config(steps=6, checkpoint_every=2))
  assert run.start == 3 and run.step == 6
  np.testing.assert_array_equal(_saved_params(tmp_path / "resumed"), _saved_params(tmp_path / "straight"))
  assert [l["step"] for l in _lines(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
  assert [l["loss"] for l in _lines(tmp_path / "resumed")] == [l["loss"] for l in _lines(tmp_path / "straight")]


def test_resume_from_an_older_checkpoint_drops_the_later_log_lines(tmp_path):
  import shutil

  _run(tmp_path, _config(steps=5, checkpoint_every=2))
  shutil.rmtree(tmp_path / "checkpoints" / "5")  # The last checkpoint is lost: resume from step 4.
  run, _ = _run(tmp_path, _config(steps=5, checkpoint_every=2))
  assert run.start == 4
  assert [l["step"] for l in _lines(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_refused_resume_rewrites_no_record(tmp_path):
  _run(tmp_path, _config(steps=2))
  recorded = {name: (tmp_path / name).read_text() for name in ("config.json", "parameters.txt", "metrics.jsonl")}
  with pytest.raises(ConfigError, match="does not match this config"):
    _run(tmp_path, _config(steps=4), state=_state("v"))  # Another model: the checkpoint does not fit.
  assert {name: (tmp_path / name).read_text() for name in recorded} == recorded


def test_only_the_primary_process_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(distributed, "is_primary", lambda: False)
  sampled = []
  run, _ = _run(tmp_path, _config(steps=2, sample_every=1), sample=lambda state, step: sampled.append(step))
  assert run.step == 2 and not run.primary
  for name in ("metrics.jsonl", "parameters.txt", "config.json"):
    assert not (tmp_path / name).exists(), name
  assert sampled == []
  assert (tmp_path / "checkpoints" / "2").is_dir()  # Orbax: every process writes checkpoints together.


def test_a_non_finite_loss_stops_at_its_log_line_and_keeps_the_last_good_checkpoint(tmp_path):
  _run(tmp_path, _config(steps=2))
  bad = {"x": np.full((8, 3), np.inf, np.float32)}
  mesh = common.make_mesh(0)
  run = loop.Run(tmp_path, _config(steps=4), Console(quiet=True))
  state = loop.restore(run, _state(), mesh)
  with pytest.raises(fitting.TrainingError, match="at step 3"):
    loop.train(run, state, loop.shuffled_step(_plain_step, bad, seed=0, batch_size=4, mesh=mesh), description="t")
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_runs_sharing_one_loop_keep_their_own_files(tmp_path):
  """Two seeds stacked in one state (as jaxldm.train.ldm_seeds does) end as two separate runs do."""
  configs = [_config(steps=3, checkpoint_every=2), _config(steps=3, checkpoint_every=2)]
  configs[1].seed = 1
  separate = [_run(tmp_path / f"separate{i}", c)[0] for i, c in enumerate(configs)]
  row = lambda i, tree: jax.tree_util.tree_map(lambda x: x[i], tree)
  mesh = common.make_mesh(1)
  runs, states = [], []
  for i, c in enumerate(configs):
    workdir, _ = common.prepare_workdir(tmp_path / f"shared{i}")
    runs.append(loop.Run(workdir, c, Console(quiet=True), state_of=functools.partial(row, i),
                         metrics_of=functools.partial(row, i)))
    states.append(loop.restore(runs[-1], _state(), mesh))
  stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)

  def step(state, s):
    batches = [{"x": EXAMPLES["x"][fitting.batch_indices(c.seed, s, 8, 4)]} for c in configs]
    return jax.vmap(_plain_step)(state, stack(batches), jnp.stack([fitting.step_key(c.seed, s) for c in configs]))

  loop.train(runs, stack(states), step, description="two seeds")
  for i, run in enumerate(runs):
    assert run.step == separate[i].step == 3
    np.testing.assert_allclose(_saved_params(run.workdir), _saved_params(separate[i].workdir), rtol=1e-6)
    assert [l["step"] for l in _lines(run.workdir)] == [1, 2, 3]
    np.testing.assert_allclose([l["loss"] for l in _lines(run.workdir)],
                               [l["loss"] for l in _lines(separate[i].workdir)], rtol=1e-6)
  assert not np.allclose(_saved_params(runs[0].workdir), _saved_params(runs[1].workdir))


# ---------------------------------------------------------------------------------------------
# Private runs: the ledger counts every step before anything computed from it leaves the loop
# ---------------------------------------------------------------------------------------------
N, Q, SIGMA, DELTA = 8, 2 / 8, 1.0, 1e-3


def _dp_cfg(**overrides) -> ml_collections.ConfigDict:
  c = dp.dp_config(private=True, tiny=True)
  c.update(dict(noise_multiplier=SIGMA, expected_batch_size=2, microbatch_size=2, delta=DELTA, noise_seed=7))
  c.update(overrides)
  return c


def _loss(params, example, rng):
  del rng
  return jnp.sum((params["w"] - example["x"]) ** 2)


def _private_step(dp_run, mesh):
  dp_cfg = _dp_cfg()

  @jax.jit
  def step_fn(state, batch, mask, num_microbatches, rng, noise_multiplier, expected_batch_size, l2_clip_norm):
    grads, metrics = dp.private_gradient(_loss, state.params, batch, mask, num_microbatches, rng, dp=dp_cfg,
                                         noise_multiplier=noise_multiplier,
                                         expected_batch_size=expected_batch_size, l2_clip_norm=l2_clip_norm)
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, state.params, grads)
    return state.replace(step=state.step + 1, params=params), metrics

  return loop.poisson_step(step_fn, EXAMPLES, dp_run, mesh)


def _private_run(workdir, steps: int, **dp_overrides):
  workdir, _ = common.prepare_workdir(workdir)
  mesh = common.make_mesh(1)
  dp_run = dp.setup(_dp_cfg(**dp_overrides), workdir, N, steps, Console(quiet=True), mesh.devices.size)
  return dp_run, mesh


def _ledger_steps(workdir) -> int:
  return json.loads((pathlib.Path(workdir) / "privacy_ledger.json").read_text())["steps"]


def _outputs_with_ledger(workdir, monkeypatch, steps=4):
  """Trains privately and lists (what left the loop, its step, the ledger's steps at that moment)."""
  seen = []
  real_save, real_write = common.Checkpointer.save, common.MetricsLog.write

  def save(self, step, state, meta=None):
    seen.append(("checkpoint", step, _ledger_steps(workdir)))
    real_save(self, step, state, meta)

  def write(self, step, metrics):
    seen.append(("log", step, _ledger_steps(workdir)))
    real_write(self, step, metrics)

  monkeypatch.setattr(common.Checkpointer, "save", save)
  monkeypatch.setattr(common.MetricsLog, "write", write)
  dp_run, mesh = _private_run(workdir, steps)
  sample = lambda state, step: seen.append(("sample", step, _ledger_steps(workdir)))
  run, _ = _run(workdir, _config(steps=steps, log_every=1, sample_every=2, checkpoint_every=2), dp_run=dp_run,
                sample=sample, mesh=mesh)
  return run, seen


def test_the_ledger_counts_every_step_before_it_leaves_the_loop(tmp_path, monkeypatch):
  run, seen = _outputs_with_ledger(tmp_path, monkeypatch)
  assert {kind for kind, _, _ in seen} == {"checkpoint", "log", "sample"}
  assert all(ledger >= step for _, step, ledger in seen), seen
  expected = accounting.epsilon(noise_multiplier=SIGMA, sampling_rate=Q, steps=4, delta=DELTA, accountant="rdp")
  assert _ledger_steps(tmp_path) == run.step == 4
  assert run.epsilon == pytest.approx(expected, rel=1e-9) and run.privacy()["epsilon"] == run.epsilon
  assert [l["epsilon"] for l in _lines(tmp_path)][-1] == pytest.approx(expected, rel=1e-9)


def test_a_loop_that_records_the_ledger_after_saving_is_caught(tmp_path, monkeypatch):
  """A broken ordering: the ledger is written only once each checkpoint is on disk."""
  pending = []
  real_record, real_save = dp.PrivateRun.record_steps, common.Checkpointer.save

  def record_later(self, done):
    pending.append((self, done))
    return self.ledger.epsilon(self.ledger_steps_at_start + done - self.start)

  def save_then_record(self, step, state, meta=None):
    real_save(self, step, state, meta)
    while pending:
      real_record(*pending.pop(0))

  monkeypatch.setattr(dp.PrivateRun, "record_steps", record_later)
  monkeypatch.setattr(common.Checkpointer, "save", save_then_record)
  _, seen = _outputs_with_ledger(tmp_path, monkeypatch)
  late = [(kind, step, ledger) for kind, step, ledger in seen if ledger < step]
  assert {kind for kind, _, _ in late} == {"checkpoint", "log", "sample"}, seen


def test_the_budget_stops_the_loop_before_the_step_it_does_not_allow(tmp_path):
  target = accounting.epsilon(noise_multiplier=SIGMA, sampling_rate=Q, steps=2, delta=DELTA, accountant="rdp") * 1.0001
  dp_run, mesh = _private_run(tmp_path, 5, target_epsilon=target)
  run, state = _run(tmp_path, _config(steps=5), dp_run=dp_run, mesh=mesh)
  assert run.stopped_for_budget and run.step == int(state.step) == 2 and run.epsilon <= target
  assert run.privacy()["stopped_for_budget"] is True
  assert _ledger_steps(tmp_path) == 2 and [l["step"] for l in _lines(tmp_path)] == [1, 2]
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 2  # The final save, at the step the budget stopped.
  ckpt.close()


def test_a_checkpoint_ahead_of_the_ledger_is_refused_before_any_record(tmp_path):
  dp_run, mesh = _private_run(tmp_path, 2)
  _run(tmp_path, _config(steps=2), dp_run=dp_run, mesh=mesh)
  ledger_path = tmp_path / "privacy_ledger.json"
  ledger = json.loads(ledger_path.read_text())
  ledger_path.write_text(json.dumps({**ledger, "steps": 1}))  # The ledger lost a step.
  config_before = (tmp_path / "config.json").read_text()
  dp_run, mesh = _private_run(tmp_path, 3)
  with pytest.raises(ConfigError, match="ledger would under-count"):
    _run(tmp_path, _config(steps=3, log_every=2), dp_run=dp_run, mesh=mesh)
  assert (tmp_path / "config.json").read_text() == config_before


def test_cached_jit_builds_once_per_key_and_convolution_route(monkeypatch):
  from jaxldm.models import conv

  monkeypatch.setattr(common, "_JITTED", {})
  builds = []

  def build():
    builds.append(1)
    return lambda x: x + 1

  first = common.cached_jit({"trainer": "t", "model": {"width": 2}}, build)
  assert common.cached_jit({"model": {"width": 2}, "trainer": "t"}, build) is first and len(builds) == 1
  assert common.cached_jit({"trainer": "t", "model": {"width": 3}}, build) is not first and len(builds) == 2
  other = "native" if conv.resolved_weight_grad() == "taps" else "taps"
  with conv.weight_grad(other):  # Read at trace time: another route is another program.
    assert common.cached_jit({"trainer": "t", "model": {"width": 2}}, build) is not first and len(builds) == 3
  assert int(first(jnp.int32(1))) == 2


def test_a_new_state_is_two_programs_and_owns_its_buffers(programs_built):
  """The optimizer's state and the EMA copy are compiled programs, not an op per leaf (eagerly, each new
  leaf shape compiled its own zeros and copy: ~2 s of a fresh trainer start for the tiny LDM)."""
  shapes = [(i + 2, 11, 13) for i in range(12)]  # Shapes nothing else here runs on.
  params = {f"w{i}": jax.device_put(np.full(s, 0.25 * i, np.float32)) for i, s in enumerate(shapes)}
  optim = fitting.optim_config(lr=1.25e-4)
  tx = fitting.make_optimizer(optim, 10)
  with programs_built() as built:
    state = jax.block_until_ready(fitting.new_state(params, tx))
  assert 1 <= len(built) <= 3, built  # The optimizer's init, the copy (and the step counter's scalar).
  assert fitting.make_optimizer(optim, 10) is tx  # Same settings, same optimizer: its programs are reused.
  with programs_built() as built:
    jax.block_until_ready(fitting.new_state(params, fitting.make_optimizer(optim, 10)))
  assert built == []
  assert fitting.make_optimizer(optim, 10, private=True) is not tx  # Another chain (no global-norm clip).
  want = tx.init(params)
  assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(want)
  for got, expected in zip(jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(want)):
    assert got.shape == expected.shape and got.dtype == expected.dtype and np.array_equal(got, expected)
  # The EMA is a copy in buffers of its own: a step donates the parameters and the EMA both.
  for p, e in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.ema_params)):
    assert np.array_equal(p, e) and p.unsafe_buffer_pointer() != e.unsafe_buffer_pointer()
