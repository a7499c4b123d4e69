"""`jaxldm bench trainer`: a DP trainer's own jitted private step (Poisson batcher included) vs its
non-private step (the LDM on synthetic latents, the autoencoder on synthetic volumes), nothing left behind."""

import json
import tempfile

import pytest

from jaxldm import cli

# A small UNet (one level, no attention) on (2, 8, 8) volumes -> (2, 4, 4, 2) latents.
SMALL = ["--config.data.shape=(2,8,8)", "--config.model.base_channels=4", "--config.model.context_dim=8",
         "--config.model.channel_mult=(1,)", "--config.model.attention_levels=()",
         "--config.model.mid_attention=False", "--config.dp.microbatch_size=2"]


def test_trainer_steps_are_timed(tmp_path, capsys, monkeypatch):
  # Temporary files of this test only: the shared temp directory also holds the other worker's.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  out = tmp_path / "trainer.json"
  code = cli.main(["bench", "trainer", "--config", "configs/ldm_dp.py:tiny", *SMALL, "--steps", "2",
                   "--warmup", "0", "--no-same-k", "--json", str(out)])
  assert code == 0
  r = json.loads(out.read_text())
  k = r["noise_multiplicity"]
  assert k == 2 and r["latent_shape"] == [2, 4, 4, 2]
  assert r["private_step_s"] > 0 and r["nonprivate_step_s"] > 0
  assert r["dp_over_k_nonprivate"] == pytest.approx(r["private_step_s"] / (k * r["nonprivate_step_s"]))
  assert len(r["times_s"]["private"]) == 2 and len(r["times_s"]["nonprivate"]) == 2
  assert "nonprivate_same_k" not in r["times_s"]
  # The batcher's static padded size is a multiple of microbatch x devices; real sizes vary.
  assert r["padded_batch"] % (r["microbatch_size"] * r["num_devices"]) == 0
  assert all(0 <= s <= r["padded_batch"] for s in r["sampled_batch_sizes"])
  # One size per TIMED step, and the rows each ran: its size padded up to a multiple of m x devices.
  m = r["microbatch_size"] * r["num_devices"]
  assert len(r["sampled_batch_sizes"]) == len(r["rows_computed"]) == 2
  assert all(rows % m == 0 and s <= rows < s + m or (s == 0 and rows == m)
             for s, rows in zip(r["sampled_batch_sizes"], r["rows_computed"]))
  # The ratio is of MEANS (a Poisson step's cost is a mixture over its sizes); medians ride along.
  assert r["statistic"] == "mean"
  assert r["private_step_s"] == pytest.approx(sum(r["times_s"]["private"]) / 2)
  assert r["median_step_s"]["private"] == pytest.approx(sorted(r["times_s"]["private"])[0] / 2
                                                        + sorted(r["times_s"]["private"])[1] / 2)
  assert r["nonprivate_batch"] % r["num_devices"] == 0
  assert not any((tmp_path / "tmp").iterdir())  # The temporary workdir is gone.
  assert "DP / (2 x nonprivate)" in capsys.readouterr().out


def test_timed_steps_are_interleaved():
  """Step s of every variant back to back, the order rotating, each state threaded through its own run."""
  import collections

  import jax.numpy as jnp

  from jaxldm.bench import trainer

  State = collections.namedtuple("State", "step")
  calls = []

  def make(name):
    def step(state, s):
      calls.append((name, s))
      return state._replace(step=state.step + 1), {"loss": jnp.zeros(())}
    return step

  runs = {n: {"step": make(n), "state": State(jnp.zeros((), jnp.int32)), "first_call_s": 0.5} for n in "abc"}
  out = trainer._time_interleaved(runs, steps=3, warmup=1, progress=None)
  assert calls == [("a", 2), ("b", 2), ("c", 2), ("b", 3), ("c", 3), ("a", 3), ("c", 4), ("a", 4), ("b", 4)]
  assert {n: (r["steps"], len(r["times_s"]), r["first_call_s"]) for n, r in out.items()} == {
      n: ([2, 3, 4], 3, 0.5) for n in "abc"}
  assert all(int(runs[n]["state"].step) == 3 for n in "abc")


def test_trainer_needs_a_dp_config(capsys):
  assert cli.main(["bench", "trainer", "--config", "configs/ldm.py:tiny"]) == 2
  assert "dp.enabled is False" in capsys.readouterr().err


def test_the_ldm_trainers_nonprivate_step_merges_examples_into_each_convolution():
  """The trainer's own non-private step (what `bench trainer` times) runs each convolution on the whole
  batch on the CPU route (`conv.merging_examples`): no convolution of one example's 6 slices is left, as
  the per-example kernel gradients of an unmerged step would be. Its private step keeps them."""
  import re

  import jax
  import jax.numpy as jnp

  from jaxldm.bench import trainer
  from jaxldm.config import load_config
  from jaxldm.models import conv
  from jaxldm.train import common, ldm

  spec = "ldm_dp:tiny"
  config = load_config(spec)
  with config.unlocked():
    config.dp.enabled = False
    config.train.batch_size = 4
    config.diffusion.noise_multiplicity = 1  # (K draws per example would merge too: 4 x K x 6.)
  latent_shape = trainer._latent_shape(spec, config)  # (6, 16, 16, 2)
  num_attributes = len(config.data.attributes)
  data = jax.tree_util.tree_map(jnp.asarray, trainer._examples(4, latent_shape, num_attributes))
  mesh = common.make_mesh(1)
  state, _ = trainer._state(config, False, latent_shape, num_attributes, mesh)
  with conv.weight_grad("slices"):
    step = ldm.jitted_step(config, False, num_attributes, latent_shape[-1])
    hlo = step.lower(state, data, jax.random.PRNGKey(0)).as_text()
  batches = {int(m.group(1)) for line in hlo.splitlines() if "stablehlo.convolution" in line
             for m in [re.search(r"\(tensor<(\d+)x", line)] if m}
  assert 4 * latent_shape[0] in batches  # 4 examples x 6 slices in one 2D convolution.
  assert latent_shape[0] not in batches, batches  # No per-example (6-slice) kernel gradient.


def test_the_autoencoder_dp_trainer_is_timed_too(tmp_path, capsys):
  out = tmp_path / "trainer.json"
  code = cli.main(["bench", "trainer", "--config", "autoencoder_dp:tiny", "--config.data.shape=(2,8,8)",
                   "--config.model.channels=(4,8)", "--config.dp.microbatch_size=2", "--steps", "2",
                   "--warmup", "0", "--json", str(out)])
  assert code == 0
  r = json.loads(out.read_text())
  assert r["trainer"] == "autoencoder" and r["volume_shape"] == [2, 8, 8] and r["noise_multiplicity"] == 1
  assert r["params"] > 0 and r["private_step_s"] > 0 and r["nonprivate_step_s"] > 0
  assert r["dp_over_k_nonprivate"] == pytest.approx(r["private_step_s"] / r["nonprivate_step_s"])
  assert set(r["times_s"]) == {"private", "nonprivate"}  # K = 1: no second non-private variant.
  assert r["padded_batch"] % 2 == 0 and all(rows % 2 == 0 for rows in r["rows_computed"])
  assert "DP / (1 x nonprivate)" in capsys.readouterr().out


def test_trainer_refuses_what_it_cannot_time(capsys):
  assert cli.main(["bench", "trainer", "--config", "autoencoder:tiny"]) == 2
  assert "dp.enabled is False" in capsys.readouterr().err
  assert cli.main(["bench", "trainer", "--config", "ssl:tiny"]) == 2
  assert "config key 'trainer'" in capsys.readouterr().err
  # As the trainer itself: a critic would see the private volumes outside the mechanism.
  assert cli.main(["bench", "trainer", "--config", "autoencoder_dp:tiny", "--config.loss.adversarial_weight=0.1"]) == 2
  assert "adversarial_weight" in capsys.readouterr().err
