"""Configs: packaged presets and Python config files, `get_config(arg)`, variants and `--config.a.b=value` overrides.

A config is named on the command line either as a preset shipped inside the package
(`--config ldm_dp:tiny`, `jaxldm/configs/ldm_dp.py`: usable after any `pip install`) or as the path of
the user's own file (`--config path/to/my.py:variant`); a user file builds on a preset with
`preset(NAME, arg)`. The spelling `configs/NAME.py[:variant]` still names the preset.

A config is a locked `ml_collections.ConfigDict`, so a misspelt key is an error at the moment it
is used on the command line, not a silently ignored setting in a three-day run. Everything here
raises `ConfigError` (a `ValueError`) with the file or key named, which the CLI prints as one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import pathlib
import pkgutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config file, variant or override that cannot be used; the message names it."""


PRESET_PACKAGE = "jaxldm.configs"
PRESET_DIR = pathlib.Path(__file__).resolve().parent / "configs"
SPEC_HELP = "a preset NAME[:variant] (e.g. ldm_dp:tiny) or a config file PATH.py[:variant]"


def presets() -> list[str]:
  """Names of the configs shipped inside the package (`jaxldm/configs/NAME.py`), sorted."""
  return sorted(m.name for m in pkgutil.iter_modules([str(PRESET_DIR)]) if not m.name.startswith("_"))


def split_spec(spec: str) -> tuple[pathlib.Path, str | None]:
  """'my/config.py:tiny' -> (path, 'tiny'); a colon only counts after '.py'."""
  path, sep, arg = spec.partition(".py:")
  if sep:
    return pathlib.Path(path + ".py"), arg
  return pathlib.Path(spec), None


def resolve_spec(spec: str) -> tuple[str, pathlib.Path | None, str | None]:
  """Where `--config SPEC` points: (NAME, None, variant) for a preset, ("", path, variant) for a file.

  The rules, in order:
    * `PATH.py[:variant]` that exists is that file (a user config), unless it is a file of the packaged
      presets, which is loaded as the preset (one module, whichever way it is named);
    * `configs/NAME.py[:variant]` that does not exist, with NAME a preset, is the preset: the spelling
      of configs from before they were packaged keeps working from any working directory;
    * `NAME[:variant]` with NAME a preset is the preset.
  Anything else is a ConfigError that lists the presets.
  """
  names = presets()
  if ".py" in spec:
    path, arg = split_spec(spec)
    if path.is_file():
      if path.resolve().parent == PRESET_DIR and path.stem in names:
        return path.stem, None, arg
      return "", path, arg
    if path.parent.name == "configs" and path.stem in names:
      return path.stem, None, arg
    raise ConfigError(f"config file {path} does not exist; give {SPEC_HELP} (presets: {', '.join(names)})")
  name, sep, arg = spec.partition(":")
  if name in names:
    return name, None, arg if sep else None
  if pathlib.Path(spec).is_file():
    return "", pathlib.Path(spec), None
  close = difflib.get_close_matches(name, names, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  raise ConfigError(f"unknown config preset {name!r}{hint}; give {SPEC_HELP}; presets: {', '.join(names)}")


def preset(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the packaged preset NAME, unlocked: how one config builds on another.

  A config file (packaged or the user's own) that starts from a preset calls this, e.g.
  `c = preset("ldm_dp", arg); c.train.steps = 50; return c`; it works wherever jaxldm is installed.
  """
  if name not in presets():
    raise ConfigError(f"unknown config preset {name!r}; presets: {', '.join(presets())}")
  try:
    module = importlib.import_module(f"{PRESET_PACKAGE}.{name}")
  except Exception as e:  # A broken preset is reported like a broken file, with its name.
    raise ConfigError(f"config preset {name} failed to import: {type(e).__name__}: {e}") from e
  return _call_get_config(module, f"config preset {name}", arg)


def config_from_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, unlocked (user configs; presets go through `preset`)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist; give {SPEC_HELP} (presets: {', '.join(presets())})")
  module_name = f"_jaxldm_config_{abs(hash(str(path.resolve())))}"
  try:
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
  except ConfigError:
    raise
  except Exception as e:  # A broken config file is a user error: report it with the file.
    raise ConfigError(f"config file {path} failed to import: {type(e).__name__}: {e}") from e
  finally:
    sys.modules.pop(module_name, None)
  return _call_get_config(module, f"config file {path}", arg)


def _call_get_config(module: Any, what: str, arg: str | None) -> ml_collections.ConfigDict:
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{what} has no get_config(arg) function")
  try:
    config = module.get_config(arg)
  except ConfigError as e:
    raise ConfigError(f"{what}: {e}") from e
  except Exception as e:
    raise ConfigError(f"{what}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{what}: get_config must return an ml_collections.ConfigDict")
  return config


def load_config(spec: str, overrides: Iterable[str] | Mapping[str, Any] = ()) -> ml_collections.ConfigDict:
  """Loads a preset or a config file (see `resolve_spec`), applies overrides and returns the locked config.

  Args:
    spec: `NAME[:variant]` of a packaged preset, or the path of a Python file defining
      `get_config(arg)`, optionally followed by `:variant`.
    overrides: `"a.b=value"` strings (the `--config.` prefix is optional) or a mapping of dotted
      keys to values.
  """
  name, path, arg = resolve_spec(spec)
  config = preset(name, arg) if path is None else config_from_file(path, arg)
  config.lock()
  if isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    items = [parse_override(o) for o in overrides]
  for key, value in items:
    apply_override(config, key, value)
  return config


def select_variant(arg: str | None, variants: Sequence[str], *, default: str) -> str:
  """Validates the `:variant` part of a config spec against the variants a file offers."""
  variant = default if arg in (None, "") else arg
  if variant not in variants:
    raise ConfigError(f"unknown config variant {variant!r}; choose one of {', '.join(variants)}")
  return variant


def parse_override(text: str) -> tuple[str, str]:
  """'--config.a.b=1' or 'a.b=1' -> ('a.b', '1')."""
  key, sep, value = text.removeprefix("--").removeprefix("config.").partition("=")
  if not sep or not key:
    raise ConfigError(f"config override {text!r} must look like --config.a.b=value")
  return key, value


def split_override_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=value` / `--config.a.b value` args from the rest of argv."""
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" not in arg:
        if i + 1 >= len(argv):
          raise ConfigError(f"config override {arg} has no value (use {arg}=VALUE)")
        arg = f"{arg}={argv[i + 1]}"
        i += 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    name = f"{prefix}{k}"
    keys.append(name)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flat_keys(v, name + "."))
  return keys


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
  close = difflib.get_close_matches(key, flat_keys(config), n=3, cutoff=0.6)
  hint = f" (did you mean {', '.join(close)}?)" if close else ""
  return ConfigError(f"unknown config key {key!r}{hint}")


def get_field(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise _unknown_key(config, key)
    node = node[part]
  return node


def apply_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key that must already exist; strings are parsed to the field's type."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise _unknown_key(config, key)
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise _unknown_key(config, key)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config key {key!r} is a group; set one of its fields, e.g. {key}.{next(iter(current.keys()), 'x')}")
  if isinstance(value, str):
    value = parse_value(value, current, key)
  try:
    with node.unlocked():
      node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key {key!r}: cannot set {value!r}: {e}") from e


_ELEMENT_NAMES = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
               "off": False}  # What a boolean field, or an element of a tuple of booleans, takes.


def _element(value: Any, kind: type) -> Any:
  """One element of a tuple override as `kind` (the type of the tuple's current elements), or ValueError."""
  if kind is bool:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
      value = _BOOL_WORDS.get(str(value).strip().lower(), value)
    if isinstance(value, bool):
      return value
  elif kind is float:
    if isinstance(value, str):
      return float(value)  # "inf", "1e-3" as bare words.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif kind is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif isinstance(value, str):
    return value
  raise ValueError(value)


def parse_value(text: str, current: Any, key: str) -> Any:
  """Parses a command-line string into the type of the field it replaces."""
  def fail(kind):
    return ConfigError(f"config key {key!r} expects {kind}, got {text!r}")

  if isinstance(current, bool):
    value = _BOOL_WORDS.get(text.strip().lower())
    if value is None:
      raise fail("true or false")
    return value
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise fail("an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise fail("a number") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    stripped = text.strip()
    if stripped in ("", "()", "[]"):
      return type(current)()
    if stripped[0] not in "([":
      stripped = f"({stripped},)"
    try:
      parsed = ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
      # Bare words: 'a,b' -> ('a', 'b').
      parsed = tuple(s.strip() for s in stripped.strip("()[]").split(",") if s.strip())
    if not isinstance(parsed, (tuple, list)):
      parsed = (parsed,)
    kinds = {type(v) for v in current}
    if len(kinds) == 1 and (kind := kinds.pop()) in _ELEMENT_NAMES:  # e.g. (8, 16): integers only.
      try:
        parsed = [_element(v, kind) for v in parsed]
      except ValueError:
        raise fail(f"a tuple of {_ELEMENT_NAMES[kind]} like {current!r}") from None
    return type(current)(parsed)
  # None or another type: best effort literal, else the raw string.
  if text.strip().lower() in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def save_config(config: ml_collections.ConfigDict, path: str | pathlib.Path) -> None:
  """Writes the resolved config as JSON next to a run, atomically."""
  from jaxldm.atomic import atomic_open
  with atomic_open(path) as f:
    f.write(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
