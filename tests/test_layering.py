"""The package layering: evaluation and inference never import the training code.

`jaxldm.eval` may import `jaxldm.infer` (and data, models, privacy, diffusion); `jaxldm.infer` may
import the evaluation modules it needs (the release safeguard) as long as none of those imports
`jaxldm.infer` back; `jaxldm.train` may import both. Every import counts, at module top or inside a
function: a function-body import is still an edge, only a later one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxldm"
NO_TRAIN = ("jaxldm.eval", "jaxldm.infer")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(name: str, source: str, *, is_package: bool = False) -> set[str]:
  """Every jaxldm module `source` imports, anywhere in it (relative imports resolved against `name`).

  `from jaxldm.x import y` counts as jaxldm.x and jaxldm.x.y (y may be a submodule).
  """
  package = name if is_package else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module
      found.add(target)
      found.update(f"{target}.{alias.name}" for alias in node.names)
  return {m for m in found if m == "jaxldm" or m.startswith("jaxldm.")}


def _within(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def violations(name: str, source: str, *, is_package: bool = False) -> list[str]:
  """The imports of module `name` that break the rule: jaxldm.train from jaxldm.eval or jaxldm.infer."""
  if not any(_within(name, p) for p in NO_TRAIN):
    return []
  return sorted(f"{name} imports {m}" for m in imported_modules(name, source, is_package=is_package)
                if _within(m, "jaxldm.train"))


def _modules() -> dict[str, tuple[str, bool]]:
  return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))}


def test_eval_and_infer_never_import_train():
  modules = _modules()
  assert any(_within(m, "jaxldm.infer") for m in modules) and any(_within(m, "jaxldm.eval") for m in modules)
  found = [v for name, (source, is_package) in modules.items() for v in violations(name, source, is_package=is_package)]
  assert found == []


def test_eval_modules_that_infer_uses_do_not_import_infer_back():
  """No cycle: the evaluation modules infer imports (and what they import within eval, and the
  jaxldm.eval package itself, which importing any of them runs) never import jaxldm.infer."""
  modules = _modules()
  graph = {name: imported_modules(name, source, is_package=is_package) & set(modules)
           for name, (source, is_package) in modules.items()}
  todo = [m for name in graph if _within(name, "jaxldm.infer") for m in graph[name] if _within(m, "jaxldm.eval")]
  used = set()
  while todo:
    m = todo.pop()
    if m in used:
      continue
    used.add(m)
    todo.extend(d for d in graph[m] | {"jaxldm.eval"} if _within(d, "jaxldm.eval"))
  back = sorted(f"{m} imports {d}" for m in used for d in graph[m] if _within(d, "jaxldm.infer"))
  assert back == []


@pytest.mark.parametrize("name, source", [
    ("jaxldm.eval.extra", "import numpy as np\n\ndef f():\n  from jaxldm.train import common\n  return common\n"),
    ("jaxldm.eval.extra", "import jaxldm.train.ldm as ldm\n"),
    ("jaxldm.infer.extra", "from jaxldm import train\n"),
    ("jaxldm.infer.extra", "class A:\n  def m(self):\n    from ..train.common import Checkpointer\n"),
    ("jaxldm.infer.extra", "from jaxldm.train.ldm import prepare\n"),
])
def test_an_added_violation_is_caught(name, source):
  assert violations(name, source)
  modules = _modules()
  modules[name] = (source, False)
  assert [v for n, (s, p) in modules.items() for v in violations(n, s, is_package=p)] == violations(name, source)


def test_allowed_imports_pass():
  assert violations("jaxldm.eval.extra", "from jaxldm.infer import generate\nfrom jaxldm.data import nifti\n") == []
  assert violations("jaxldm.train.extra", "from jaxldm.eval import features\nfrom jaxldm.train import common\n") == []
  # A module whose name merely starts like the package is not the package.
  assert violations("jaxldm.infer.extra", "import jaxldm.training_notes\n") == []
