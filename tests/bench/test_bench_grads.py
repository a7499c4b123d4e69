"""`jaxldm bench grads` / `compare`: the modes compute the same gradient, the records are complete."""

import json

import jax
import numpy as np
import pytest

from jaxldm import cli
from jaxldm.bench import grads, report

TINY_AE = ["--config.data.shape=(2,8,8)", "--config.model.channels=(4,8)"]


@pytest.fixture(scope="module")
def target():
  return grads.build_target("autoencoder", "configs/autoencoder.py:tiny", TINY_AE)


def test_modes_agree_without_clipping_or_noise(target):
  """With C huge and sigma 0, DP modes (vmap, microbatched, loop) equal the plain batched gradient."""
  batch = target.make_batch(4)
  rng = jax.random.PRNGKey(3)
  out = {m: jax.jit(grads.gradient_fn(m, target, 4, microbatch=2, l2_clip_norm=1e9,
                                      noise_multiplier=0.0))(target.params, batch, rng)
         for m in grads.MODES}
  for m in grads.MODES:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                           out[m], out["nonprivate"])


def test_dp_mode_clips_and_adds_noise(target):
  """With C small the DP gradient differs from the plain one, and two keys give different noise."""
  batch = target.make_batch(2)
  f = jax.jit(grads.gradient_fn("vmap", target, 2, microbatch=1, l2_clip_norm=1e-3))
  a, b = f(target.params, batch, jax.random.PRNGKey(0)), f(target.params, batch, jax.random.PRNGKey(1))
  diff = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: float(np.abs(x - y).max()), a, b))
  assert max(diff) > 1e-4  # Noise std is 1 * C / B = 5e-4 per coordinate.


def test_cli_writes_records_and_plot(tmp_path, capsys):
  out = tmp_path / "grads.json"
  code = cli.main(["bench", "grads", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny",
                   *TINY_AE, "--batch", "2", "--modes", "nonprivate,vmap", "--repeats", "2",
                   "--warmup", "0", "--json", str(out)])
  assert code == 0
  records = report.load(out)
  assert [(r["mode"], r["batch"]) for r in records] == [("nonprivate", 2), ("vmap", 2)]
  for r in records:
    assert r["step_s"] > 0 and r["examples_per_s"] == pytest.approx(2 / r["step_s"])
    assert r["params"] > 0 and r["peak_bytes"] > 0 and r["backend"] == "cpu"
    assert len(r["times_s"]) == 2 and r["step_s"] == pytest.approx(np.median(r["times_s"]))
    assert r["memory"]["temp_bytes"] > 0 and r["flops"] > 0 and r["useful_tflops_per_s"] > 0
    assert r["conv_weight_grad"] in ("slices", "taps", "native")
  assert records[0]["ratio_to_nonprivate"] == 1.0
  assert (tmp_path / "grads.png").stat().st_size > 1000
  assert "vmap" in capsys.readouterr().out

  # compare: B / A ratios on matching (model, batch); a file compared with itself gives 1.
  code = cli.main(["bench", "compare", str(out), str(out)])
  assert code == 0
  rows = report.compare(records, records)
  same = [r["ratio"] for r in rows if r["a_mode"] == r["b_mode"]]
  assert same == [1.0, 1.0]
  assert cli.main(["bench", "compare", "--from-files", str(out), str(out)]) == 0


def test_bad_inputs_are_user_errors(tmp_path, capsys):
  assert cli.main(["bench", "grads", "--model", "unet", "--config", "configs/autoencoder.py:tiny"]) == 2
  assert "needs an LDM config" in capsys.readouterr().err
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"mode": "vmap"}]))
  assert cli.main(["bench", "compare", str(bad), str(bad)]) == 2
  assert "lacks" in capsys.readouterr().err
  assert cli.main(["bench", "grads", "--model", "autoencoder", "--config", "configs/autoencoder.py:tiny",
                   *TINY_AE, "--modes", "ghostly"]) == 2
  assert "unknown mode" in capsys.readouterr().err
