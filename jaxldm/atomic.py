"""Atomic file writes: readers see the old file or the new one, never half of one.

Used for everything a run may read back after a crash (configs, ledgers, caches, reports,
figures): write a temporary file in the same directory, fsync, then `os.replace`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, private: bool = False) -> Iterator[IO]:
  """Opens a temporary sibling of `path` for writing; on success it replaces `path`.

  On any exception (including KeyboardInterrupt) the temporary file is removed and `path` keeps
  its old content. private=True keeps the file readable by its owner only (0600) from the first
  byte, for secrets such as DP noise seeds; otherwise it gets the usual 0644.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    if not private:
      os.fchmod(fd, 0o644)
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
