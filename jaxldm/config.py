"""Python config files: `get_config(arg)` loading, variants and `--config.a.b=value` overrides.

A config is a locked `ml_collections.ConfigDict`, so a misspelt key is an error at the moment it
is used on the command line, not a silently ignored setting in a three-day run. Everything here
raises `ConfigError` (a `ValueError`) with the file or key named, which the CLI prints as one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config file, variant or override that cannot be used; the message names it."""


def split_spec(spec: str) -> tuple[pathlib.Path, str | None]:
  """'configs/ldm.py:tiny' -> (path, 'tiny'); a colon only counts after '.py'."""
  path, sep, arg = spec.partition(".py:")
  if sep:
    return pathlib.Path(path + ".py"), arg
  return pathlib.Path(spec), None


def config_from_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, unlocked: also how one config file builds on another."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist (give a path like configs/data.py or configs/data.py:tiny)")
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
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config(arg) function")
  try:
    config = module.get_config(arg)
  except ConfigError as e:
    raise ConfigError(f"config file {path}: {e}") from e
  except Exception as e:
    raise ConfigError(f"config file {path}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config must return an ml_collections.ConfigDict")
  return config


def load_config(spec: str, overrides: Iterable[str] | Mapping[str, Any] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:variant]`, applies overrides and returns the locked config.

  Args:
    spec: path to a Python file defining `get_config(arg)`, optionally followed by `:variant`.
    overrides: `"a.b=value"` strings (the `--config.` prefix is optional) or a mapping of dotted
      keys to values.
  """
  config = config_from_file(*split_spec(spec))
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


def parse_value(text: str, current: Any, key: str) -> Any:
  """Parses a command-line string into the type of the field it replaces."""
  def fail(kind):
    return ConfigError(f"config key {key!r} expects {kind}, got {text!r}")

  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
      return True
    if low in ("false", "0", "no", "off"):
      return False
    raise fail("true or false")
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
