"""The shipped public models (jaxldm/pretrained_models/): intact, loadable, and the LDM samples volumes."""

import json

import numpy as np
import pytest

from jaxldm import pretrained

pytestmark = pytest.mark.skipif(not pretrained.available("tiny"), reason="no shipped tiny models")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  out = tmp_path_factory.mktemp("shipped")
  return out, pretrained.install(out, "tiny", public_root=out / "phantoms/public")


def test_files_match_their_record():
  record = pretrained.verify("tiny")
  assert set(record["stages"]) == set(pretrained.STAGES)
  assert record["data"]["domain"] == "public" and record["data"]["seed"] not in (1, 2)  # Not the demo's private seeds.
  for stage, entry in record["stages"].items():
    assert pretrained.PARAMS_FILE in entry["sha256"] and entry["step"] > 0
    size = (pretrained.PACKAGE_DIR / "tiny" / stage / pretrained.PARAMS_FILE).stat().st_size
    assert size < 4 << 20, f"{stage}: {size} bytes"
  assert "python -m jaxldm.pretrained train" in record["command"]


def test_a_changed_file_is_refused(tmp_path):
  import shutil

  root = tmp_path / "tiny"
  shutil.copytree(pretrained.PACKAGE_DIR / "tiny", root)
  with open(root / "ssl" / pretrained.PARAMS_FILE, "ab") as f:
    f.write(b"\0")
  with pytest.raises(ValueError, match="sha256"):
    pretrained.verify("tiny", root)


def test_the_ldm_records_public_attribute_statistics(installed):
  out, dirs = installed
  info = json.loads((dirs["ldm"] / "ldm.json").read_text())
  assert info["private"] is False
  assert len(info["attribute_mean"]) == len(info["attribute_std"]) == len(info["attributes"]) > 0
  assert info["autoencoder_workdir"] == str(dirs["autoencoder"])
  config = json.loads((dirs["ldm"] / "config.json").read_text())
  assert config["data"]["root"] == str(out / "phantoms/public")


def test_installed_models_load_and_sample(installed):
  from jaxldm.eval import features
  from jaxldm.infer import autoencoder, generate

  _, dirs = installed
  ae_model, ae_params, ae_info = autoencoder.load_autoencoder(dirs["autoencoder"])
  assert ae_info["data_shape"] == [6, 32, 32]
  extractor = features.get_extractor("ssl3d", weights=str(dirs["ssl"]), batch_size=2)
  emb = extractor(np.zeros((2, 6, 32, 32), np.float32))
  assert emb.shape == (2, extractor.feature_dim) and np.isfinite(emb).all()
  volumes, values, mask, _ = generate.generate(dirs["ldm"], 2, num_steps=3, batch_size=2,
                                               fixed={"phase": 1.0, "lv_esv_ml": 60.0})
  assert volumes.shape == (2, 6, 32, 32) and np.isfinite(volumes).all()


def test_a_second_generate_with_the_same_settings_reuses_the_sampler(installed, monkeypatch):
  from jaxldm.diffusion import samplers
  from jaxldm.infer import generate

  _, dirs = installed
  traced = []
  sample = samplers.sample
  monkeypatch.setattr(generate, "sample", lambda *a, **k: traced.append(1) or sample(*a, **k))
  generate._jitted_sampler.cache_clear()  # The sampler above was built before the counter.
  draw = lambda **kw: generate.generate(dirs["ldm"], 2, num_steps=2, batch_size=2, **kw)[0]
  first, again = draw(seed=1), draw(seed=1)
  assert len(traced) == 1  # Traced once: the second call ran the same jitted sampler.
  np.testing.assert_array_equal(first, again)
  draw(seed=1, guidance_scale=2.0)
  assert len(traced) == 2  # Other settings: another sampler.


def test_a_checkpoint_is_not_loaded_into_another_model(installed):
  """Parameters are matched by name: a model configured unlike the run that wrote it is refused."""
  import jax
  import jax.numpy as jnp

  from jaxldm.config import ConfigError
  from jaxldm.infer import checkpoints
  from jaxldm.infer.ldm import build_unet

  _, dirs = installed
  info = json.loads((dirs["ldm"] / "ldm.json").read_text())
  model = dict(info["model"])
  model["attribute_embedding"] = not model.get("attribute_embedding", False)
  unet = build_unet(model, len(info["attributes"]), info["latent_shape"][-1])
  target = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, *info["latent_shape"])),
                          jnp.zeros((1,), jnp.int32))
  with pytest.raises(ConfigError, match=r"does not fit the configured model: (missing|unexpected) .*attribute_embedding"):
    checkpoints.restore_params(dirs["ldm"] / "checkpoints", target)


def test_retraining_the_ldm_over_the_shipped_first_stage(tmp_path):
  """train(keep_shipped=...) installs those stages instead of training them; export marks them reused
  and ships them bit for bit, with the newly trained LDM next to them."""
  import dataclasses

  recipe = dataclasses.replace(pretrained.RECIPES["tiny"], n_public=4, ldm_steps=2,
                               # One attention block (the middle one): the stages' bookkeeping is tested, not the UNet.
                               overrides={"ldm": {"train.sample_every": 0, "train.checkpoint_every": 2,
                                                  "train.batch_size": 4, "model.attention_levels": ()}})
  said = []
  run = pretrained.train(tmp_path / "run", "tiny", recipe=recipe, keep_shipped=("autoencoder", "ssl"),
                         say=said.append)
  assert said[0] == "shipped autoencoder, ssl: installed, not trained"
  assert not any(line.startswith(("autoencoder (", "ssl encoder (")) for line in said)
  dest = pretrained.export(run, "tiny", dest=tmp_path / "tiny", recipe=recipe)
  record, shipped = pretrained.verify("tiny", dest), pretrained.verify("tiny")
  for stage in ("autoencoder", "ssl"):
    assert record["stages"][stage]["reused_shipped"] == shipped["stages"][stage]["sha256"]
    assert record["stages"][stage]["sha256"][pretrained.PARAMS_FILE] == shipped["stages"][stage]["sha256"][pretrained.PARAMS_FILE]
  assert "reused_shipped" not in record["stages"]["ldm"] and record["stages"]["ldm"]["step"] == 2
  with pytest.raises(ValueError, match="unknown stage"):
    pretrained.train(tmp_path / "other", "tiny", recipe=recipe, keep_shipped=("vae",))
  with pytest.raises(SystemExit) as exit_info:
    pretrained.main(["train", "--out", str(tmp_path / "cli"), "--keep-shipped", "autoencoder,vae"])
  assert exit_info.value.code == 2 and not (tmp_path / "cli").exists()
