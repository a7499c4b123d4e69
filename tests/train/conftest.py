"""A tiny NIfTI dataset (smooth random volumes) shared by the trainer tests."""

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter


@pytest.fixture(scope="session")
def tiny_nifti_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_nifti")
  rng = np.random.default_rng(0)
  for i in range(8):
    v = gaussian_filter(rng.normal(size=(16, 16, 4)), (2, 2, 0.5)).astype(np.float32)
    nib.save(nib.Nifti1Image(v, np.diag([4.0, 4.0, 20.0, 1.0])), root / f"s{i:02d}.nii.gz")
  return root
