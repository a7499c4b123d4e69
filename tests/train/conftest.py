"""A tiny NIfTI dataset (smooth random volumes) shared by the trainer tests, and the scan of a DP run's
compiled programs for its private data."""

import contextlib
import pathlib

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


class ProgramScan:
  """What a persistent XLA cache would store of a run: `with scan.recording() as keys:` notes the cache key
  of every program built inside (JAX's in-memory caches are cleared first, so each goes through the
  persistent cache: compiled and written, or read); `scan.holding(arrays, keys)` lists the entries whose
  compiled program holds bytes of `arrays`: 16-byte windows (4 float32s, 8 per example) searched in each
  decompressed executable. Uses the tests' own cache (tests/conftest.py) and JAX's private cache module."""

  def __init__(self, monkeypatch):
    from jax._src import compilation_cache

    self._cache = compilation_cache
    self._recording = []  # The key sets of the open `recording()` blocks.

    def noting(cache_fn):  # The cache's own read or write, with the key noted.
      def noted(cache_key, *args, **kwargs):
        for keys in self._recording:
          keys.add(cache_key)
        return cache_fn(cache_key, *args, **kwargs)
      return noted
    for name in ("get_executable_and_time", "put_executable_and_time"):
      monkeypatch.setattr(compilation_cache, name, noting(getattr(compilation_cache, name)))

  @contextlib.contextmanager
  def recording(self):
    """The keys of every program the block runs, those built earlier in the process included (JAX's
    in-memory caches are cleared first, so none is served from memory)."""
    import jax

    jax.clear_caches()
    keys = set()
    self._recording.append(keys)
    try:
      yield keys
    finally:
      self._recording.remove(keys)

  def holding(self, arrays, keys) -> list[str]:
    import jax

    rng, windows = np.random.default_rng(0), []
    for example in np.asarray(arrays, np.float32).reshape(len(arrays), -1):
      for o in rng.integers(0, example.size - 4, 8):
        if np.ptp(example[o:o + 4]) > 0:
          windows.append(example[o:o + 4].tobytes())
    cache_dir = pathlib.Path(jax.config.jax_compilation_cache_dir)
    found = []
    for key in sorted(keys):
      data = self._cache.decompress_executable((cache_dir / f"{key}-cache").read_bytes())
      if any(w in data for w in windows):
        found.append(key)
    return found

  def closure_control(self, arrays) -> list[str]:
    """The deliberately broken variant: the entries holding `arrays` among those of a program that closes
    over two of them (its compiled constants); a scan with power finds exactly that one."""
    import jax
    import jax.numpy as jnp

    with self.recording() as keys:
      jax.jit(lambda x: x * jnp.asarray(arrays[:2]))(jnp.ones(arrays[:2].shape)).block_until_ready()
    return self.holding(arrays, keys)


@pytest.fixture
def program_scan(monkeypatch):
  """A ProgramScan. `jax.clear_caches()` makes every later test of the worker trace its programs again:
  tests using this go last in their file."""
  return ProgramScan(monkeypatch)
