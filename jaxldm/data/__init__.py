"""Data: NIfTI I/O and preprocessing, datasets with attribute tables, the phantom benchmark.

The names below load their module on first use (PEP 562): `jaxldm.data.errors` (what every CLI command
imports) no longer pulls in nibabel and scipy, ~0.7 s of each command's start.
"""

import importlib

_WHERE = {"DataError": "errors", "Preprocessing": "dataset", "VolumeDataset": "dataset",
          "find_volumes": "dataset", "read_attributes": "dataset", "load_volume": "nifti",
          "read_nifti": "nifti"}

__all__ = sorted(_WHERE) + ["phantoms"]  # phantoms: the benchmark is part of the data API.


def __getattr__(name: str):
  if name == "phantoms":
    return importlib.import_module("jaxldm.data.phantoms")
  if name in _WHERE:
    return getattr(importlib.import_module(f"jaxldm.data.{_WHERE[name]}"), name)
  raise AttributeError(f"module 'jaxldm.data' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
