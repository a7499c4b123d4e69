"""Data: NIfTI I/O and preprocessing, datasets with attribute tables, the phantom benchmark."""

from jaxldm.data.errors import DataError

__all__ = ["DataError"]
