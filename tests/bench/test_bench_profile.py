"""`jaxldm bench profile`: one step's operations from the XLA profiler, joined to the compiled HLO."""

import json

import jax
import jax.numpy as jnp
import pytest

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


def test_the_entry_computation_is_not_read_as_the_body_of_the_one_before_it():
  # The fused computation printed just before ENTRY holds an add only; the entry's own convolution must
  # not make the fusion that calls it a convolution.
  text = """HloModule m

%fused_add (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  ROOT %add.1 = f32[4]{0} add(%p0, %p1), metadata={op_name="jit(f)/add"}
}

ENTRY %main.9 (a: f32[4], x: f32[1,4,4,1], k: f32[3,3,1,1]) -> (f32[4], f32[1,4,4,1]) {
  %a = f32[4]{0} parameter(0)
  %x = f32[1,4,4,1]{3,2,1,0} parameter(1)
  %k = f32[3,3,1,1]{3,2,1,0} parameter(2)
  %add_fusion = f32[4]{0} fusion(%a, %a), kind=kLoop, calls=%fused_add
  %convolution.2 = f32[1,4,4,1]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/conv"}
  ROOT %tuple = (f32[4]{0}, f32[1,4,4,1]{3,2,1,0}) tuple(%add_fusion, %convolution.2)
}
"""
  ops = profile.hlo_instructions(text)
  assert ops["add_fusion"]["kind"] == "elementwise" and ops["add_fusion"]["op_name"] == "jit(f)/add"
  assert ops["convolution.2"]["kind"] == "convolution" and ops["convolution.2"]["shape"] == "f32[1,4,4,1]"


def test_a_wrong_mode_or_call_count_is_one_line_naming_the_flag(capsys):
  code = cli.main(["bench", "profile", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny", *TINY_AE,
                   "--mode", "vmapp"])
  assert code == 2
  assert "--mode" in capsys.readouterr().err
  code = cli.main(["bench", "profile", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny", *TINY_AE,
                   "--calls", "0"])
  assert code == 2
  assert "--calls 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["grads", "profile"])
def test_conv_weight_grad_flag_sets_the_route(command, monkeypatch):
  from jaxldm.models import conv

  monkeypatch.setitem(conv._setting, "weight_grad", "auto")  # Restored after the test.
  args = cli.build_parser().parse_args(["bench", command, "--model", "autoencoder", "--config",
                                        "autoencoder:tiny", "--conv-weight-grad", "taps"])
  cli._set_conv_route(args)
  assert conv.resolved_weight_grad() == "taps"
  cli._set_conv_route(cli.build_parser().parse_args(["bench", command, "--model", "unet", "--config", "ldm:tiny"]))
  assert conv.resolved_weight_grad() == "taps"  # No flag: the route is left as it was.
