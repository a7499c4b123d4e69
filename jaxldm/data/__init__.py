"""Data: NIfTI I/O and preprocessing, datasets with attribute tables, the phantom benchmark."""

from jaxldm.data.dataset import Preprocessing, VolumeDataset, find_volumes, read_attributes
from jaxldm.data.errors import DataError
from jaxldm.data.nifti import load_volume, read_nifti

__all__ = ["DataError", "Preprocessing", "VolumeDataset", "find_volumes", "load_volume",
           "read_attributes", "read_nifti"]

from jaxldm.data import phantoms  # noqa: E402  (the benchmark is part of the data API)

__all__.append("phantoms")
