"""A tiny NIfTI dataset (smooth random volumes) shared by the trainer tests."""

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter


def write_tiny_nifti(root, seed: int, n: int = 8):
  """n smooth random volumes (16 x 16 x 4 voxels) named s00.nii.gz ... into root."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    v = gaussian_filter(rng.normal(size=(16, 16, 4)), (2, 2, 0.5)).astype(np.float32)
    nib.save(nib.Nifti1Image(v, np.diag([4.0, 4.0, 20.0, 1.0])), root / f"s{i:02d}.nii.gz")
  return root


@pytest.fixture(scope="session")
def tiny_nifti_dir(tmp_path_factory):
  return write_tiny_nifti(tmp_path_factory.mktemp("tiny_nifti"), seed=0)


@pytest.fixture(scope="session")
def public_nifti_dir(tmp_path_factory):
  """Other volumes of the same shape: the 'public' data of the first stages of a DP pipeline."""
  return write_tiny_nifti(tmp_path_factory.mktemp("tiny_public"), seed=100)
