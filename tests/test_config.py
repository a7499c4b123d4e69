"""Presets and config files, variants, overrides and locking."""

import pathlib
import textwrap

import pytest

from jaxldm import config as config_lib
from jaxldm.config import ConfigError, load_config, parse_override, preset, presets, split_override_args, to_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "jaxldm" / "configs"


def _write(tmp_path, body):
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent(body))
  return path


SAMPLE = """
  import ml_collections
  from jaxldm.config import select_variant

  def get_config(arg=None):
    variant = select_variant(arg, ("small", "big"), default="small")
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.width = 8 if variant == "small" else 64  # Channels.
    c.model.rate = 0.5
    c.model.name = "unet"
    c.model.attention = True
    c.model.levels = (1, 2)
    c.model.seed = ml_collections.config_dict.placeholder(int)
    return c
"""


def test_variants_and_typed_overrides(tmp_path):
  path = _write(tmp_path, SAMPLE)
  assert load_config(str(path)).model.width == 8
  c = load_config(f"{path}:big", ["--config.model.rate=0.25", "model.name=vae",
                                   "--config.model.attention=false", "model.levels=3,4,5",
                                   "model.seed=7"])
  assert c.model.width == 64
  assert c.model.rate == 0.25 and isinstance(c.model.rate, float)
  assert c.model.name == "vae"
  assert c.model.attention is False
  assert c.model.levels == (3, 4, 5)
  assert c.model.seed == 7


def test_misspelt_key_is_named(tmp_path):
  path = _write(tmp_path, SAMPLE)
  with pytest.raises(ConfigError, match=r"unknown config key 'model.widht'.*model.width"):
    load_config(str(path), ["model.widht=3"])
  with pytest.raises(ConfigError, match="unknown config key 'modle.width'"):
    load_config(str(path), ["modle.width=3"])


def test_config_is_locked(tmp_path):
  c = load_config(str(_write(tmp_path, SAMPLE)))
  with pytest.raises(AttributeError):
    c.model.widht = 3


@pytest.mark.parametrize("word, value", [("yes", True), ("On", True), ("1", True), ("off", False), ("NO", False),
                                         ("0", False), ("false", False)])
def test_boolean_words(tmp_path, word, value):
  c = load_config(str(_write(tmp_path, SAMPLE)), [f"model.attention={word}"])
  assert c.model.attention is value


def test_bad_values_name_the_key(tmp_path):
  path = _write(tmp_path, SAMPLE)
  with pytest.raises(ConfigError, match="'model.width' expects an integer"):
    load_config(str(path), ["model.width=wide"])
  with pytest.raises(ConfigError, match="'model.attention' expects true or false"):
    load_config(str(path), ["model.attention=maybe"])
  with pytest.raises(ConfigError, match="'model' is a group"):
    load_config(str(path), ["model=3"])
  # Tuples keep their element type: a word where the channels go is named here, not deep in a model.
  with pytest.raises(ConfigError, match=r"'model.levels' expects a tuple of integers like \(1, 2\), got 'oops'"):
    load_config(str(path), ["model.levels=oops"])
  with pytest.raises(ConfigError, match="'model.levels' expects a tuple of integers"):
    load_config(str(path), ["model.levels=(1, 2.5)"])


def test_tuple_overrides_of_presets_keep_their_element_types():
  c = load_config("autoencoder:tiny", ["model.channels=(4,8)", "data.attributes=lv_edv,rv_edv",
                                       "data.spacing=(10, 1.5, 1.5)"])
  assert c.model.channels == (4, 8)
  assert c.data.attributes == ("lv_edv", "rv_edv")
  assert c.data.spacing == (10.0, 1.5, 1.5) and all(isinstance(v, float) for v in c.data.spacing)
  with pytest.raises(ConfigError, match="'model.kernel' expects a tuple of integers"):
    load_config("autoencoder:tiny", ["model.kernel=(1,3,x)"])
  grid = load_config("ablation:tiny", ["grid.target_epsilon=10,inf", "grid.pretrained=true,false"]).grid
  assert grid.target_epsilon == (10.0, float("inf")) and grid.pretrained == (True, False)
  assert load_config("ablation:tiny", ["grid.pretrained=1,0"]).grid.pretrained == (True, False)
  with pytest.raises(ConfigError, match="'grid.pretrained' expects a tuple of true/false values"):
    load_config("ablation:tiny", ["grid.pretrained=maybe"])


def test_unknown_variant_and_missing_file(tmp_path):
  path = _write(tmp_path, SAMPLE)
  with pytest.raises(ConfigError, match=r"unknown config variant 'huge'; choose one of small, big"):
    load_config(f"{path}:huge")
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(str(tmp_path / "nope.py"))


def test_broken_config_file_is_named(tmp_path):
  path = _write(tmp_path, "def get_config(arg=None):\n  return 1 / 0\n")
  with pytest.raises(ConfigError, match=r"cfg.py.*ZeroDivisionError"):
    load_config(str(path))


def test_override_parsing():
  assert parse_override("--config.a.b=1") == ("a.b", "1")
  overrides, rest = split_override_args(["data", "prepare", "--config", "x.py", "--config.a=1", "--config.b", "2"])
  assert overrides == ["--config.a=1", "--config.b=2"]
  assert rest == ["data", "prepare", "--config", "x.py"]
  with pytest.raises(ConfigError):
    parse_override("--config.a")


CONFIG_GROUP_SOURCES = ["jaxldm/data/defaults.py", "jaxldm/train/ldm_config.py", "jaxldm/fitting.py",
                        "jaxldm/train/dp.py"]


def test_presets_are_the_packaged_modules():
  names = presets()
  assert names == sorted(p.stem for p in PRESET_DIR.glob("*.py") if p.stem != "__init__")
  assert {"autoencoder", "autoencoder_dp", "data", "ldm", "ldm_dp", "ablation"} <= set(names)


@pytest.mark.parametrize("name", presets())
def test_shipped_configs_load_and_every_field_is_commented(name):
  """Each preset loads, and each field assignment carries a comment (STYLE: one per field)."""
  load_config(name)
  for source in [PRESET_DIR / f"{name}.py"] + [ROOT / s for s in CONFIG_GROUP_SOURCES]:
    for line in source.read_text().splitlines():
      stripped = line.strip()
      if stripped.startswith(("c.", "config.")) and " = " in stripped and "ConfigDict()" not in stripped:
        assert "#" in stripped, f"{source.name}: field without a comment: {stripped}"


def test_preset_by_name_and_variant():
  tiny = load_config("ldm_dp:tiny", ["train.steps=3"])
  assert tiny.trainer == "ldm" and tiny.dp.enabled and tiny.train.steps == 3
  assert tuple(tiny.data.shape) == (6, 32, 32)
  assert load_config("ldm_dp").model.base_channels == load_config("ldm_dp:default").model.base_channels == 128
  assert load_config("autoencoder").dp.enabled is False and load_config("autoencoder_dp:tiny").dp.enabled is True
  with pytest.raises(ConfigError, match=r"config preset ldm_dp: unknown config variant 'huge'; choose one of tiny"):
    load_config("ldm_dp:huge")


def test_unknown_preset_lists_the_presets():
  with pytest.raises(ConfigError, match=r"unknown config preset 'ldm_pd' \(did you mean ldm_dp\?\)") as e:
    load_config("ldm_pd:tiny")
  assert all(name in str(e.value) for name in presets())
  with pytest.raises(ConfigError, match="unknown config preset 'nope'"):
    preset("nope")


def test_a_user_file_builds_on_a_preset(tmp_path):
  path = _write(tmp_path, """
    from jaxldm.config import preset

    def get_config(arg=None):
      c = preset("ldm_dp", arg)
      c.train.steps = 7  # Shorter.
      return c
  """)
  c = load_config(f"{path}:tiny")
  assert c.train.steps == 7 and c.dp.enabled and c.model.base_channels == preset("ldm_dp", "tiny").model.base_channels
  with pytest.raises(ConfigError, match=r"cfg.py: config preset ldm_dp: unknown config variant 'huge'"):
    load_config(f"{path}:huge")


def test_legacy_configs_path_names_the_preset(tmp_path, monkeypatch):
  """`configs/NAME.py[:variant]`, the spelling from before the configs were packaged, still works."""
  expected = to_dict(load_config("ldm_dp:tiny"))
  monkeypatch.chdir(tmp_path)  # No configs/ here: the spelling maps to the preset.
  assert to_dict(load_config("configs/ldm_dp.py:tiny")) == expected
  assert to_dict(load_config(str(tmp_path / "nowhere/configs/ldm_dp.py:tiny"))) == expected
  assert to_dict(load_config(str(PRESET_DIR / "ldm_dp.py:tiny"))) == expected  # The packaged file by path.
  assert config_lib.resolve_spec("configs/autoencoder.py") == ("autoencoder", None, None)
  with pytest.raises(ConfigError, match=r"config file configs/nope.py does not exist.*presets: ablation"):
    load_config("configs/nope.py")
  # A user's own configs/NAME.py that exists is their file, not the preset.
  (tmp_path / "configs").mkdir()
  _write(tmp_path / "configs", SAMPLE).rename(tmp_path / "configs/ldm.py")
  assert load_config("configs/ldm.py:big").model.width == 64


def test_presets_work_from_another_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert load_config("study_memorization:tiny").base.ldm_dp == "ldm_dp:tiny"
  assert load_config("data:tiny").data.shape == (6, 32, 32)
  assert preset("autoencoder", "tiny").model.latent_channels == 2
