"""`jaxldm bench profile`: one step's operations from the XLA profiler, joined to the compiled HLO."""

import json

import jax
import jax.numpy as jnp

from jaxldm import cli
from jaxldm.bench import profile

TINY_AE = ["--config.data.shape=(2,8,8)", "--config.model.channels=(4,8)"]


def _profile(tmp_path, mode):
  out = tmp_path / f"{mode}.json"
  code = cli.main(["bench", "profile", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny", *TINY_AE,
                   "--batch", "2", "--mode", mode, "--calls", "1", "--json", str(out)])
  assert code == 0
  return json.loads(out.read_text())


def test_profile_names_every_timed_operation_and_the_private_step_has_per_example_convolutions(tmp_path):
  plain, private = _profile(tmp_path, "nonprivate"), _profile(tmp_path, "vmap")
  for result in (plain, private):
    assert result["step_ms"] > 0 and result["ops"]
    assert {r["kind"] for r in result["ops"]} <= set(profile.KINDS)
    assert all(r["shape"] and r["ms"] >= 0 and r["count"] >= 1 for r in result["ops"])
    assert abs(sum(r["ms"] for r in result["ops"]) - result["operation_ms_per_call"]) < 1e-6
    assert result["by_kind"]["convolution"]["ms"] > 0
    assert any("conv" in r["op_name"] for r in result["ops"] if r["kind"] == "convolution")
  # The 4-channel layers are too narrow to pair examples (conv.PAIR_MIN_CHANNELS): there each example's
  # kernel gradient is a convolution of its own in the private step, one per layer for the whole batch
  # in the non-private one.
  assert private["by_kind"]["convolution"]["count"] > plain["by_kind"]["convolution"]["count"]


def test_hlo_instructions_are_classified_by_what_they_compute():
  f = jax.jit(lambda a, b: (jnp.tanh(a @ b).sum(0), (a * 2.0).T.copy()))
  a = jnp.ones((64, 32))
  text = f.lower(a, jnp.ones((32, 16))).compile().as_text()
  kinds = {info["kind"] for info in profile.hlo_instructions(text).values()}
  assert {"matmul", "reduction"} <= kinds


def test_a_wrong_mode_is_one_line_naming_the_flag(capsys):
  code = cli.main(["bench", "profile", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny", *TINY_AE,
                   "--mode", "vmapp"])
  assert code == 2
  assert "--mode" in capsys.readouterr().err
