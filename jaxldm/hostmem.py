"""Host memory for XLA:CPU: transparent huge pages for the buffers malloc hands out.

XLA:CPU allocates an execution's temporaries as one buffer (188 MiB for the tiny autoencoder's
training step at batch 16) with malloc. glibc serves a request that large with mmap and unmaps it on
free, so every step faults all of its pages in again: 48,000 4-KiB page faults per step there, about a
fifth of the process's CPU time spent in the kernel zeroing and mapping pages. Linux's transparent
huge pages (THP) would map them 2 MiB at a time, but most distributions ship THP in `madvise` mode:
only memory that asks for it gets it. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes
malloc ask. Measured (2-core CPU, benchmarks/NOTES.md, session 13): ~500 page faults per step instead
of 48,000; the tiny models' steps 0-34% faster, median 15% (12 pairs of runs: autoencoder and UNet,
batch 8 and 16, private and non-private). PyTorch's steps did not change (its tensors are small
enough for malloc's heap).

glibc reads tunables once, when a process starts. The `jaxldm` command therefore re-executes itself
once, at its first line, with the tunable added to GLIBC_TUNABLES (`reexec_with_huge_pages`), when
it would change anything: Linux, glibc >= 2.35, THP in `madvise` mode, the tunable not yet set.
`JAXLDM_NO_HUGE_PAGES=1` turns this off. Library users and test runs set the variable themselves
(`make test` does): `export GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE_NAME = "glibc.malloc.hugetlb"
TUNABLE = f"{TUNABLE_NAME}=1"
OPT_OUT = "JAXLDM_NO_HUGE_PAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's THP mode ("always", "madvise" or "never"; the bracketed word), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
  """(major, minor) of the C library when it is glibc, else None."""
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return None
  try:
    return tuple(int(v) for v in version.split(".")[:2])
  except ValueError:
    return None


def tunable_set(environ: Mapping[str, str]) -> bool:
  """Whether GLIBC_TUNABLES already says something about malloc's huge pages."""
  return TUNABLE_NAME in environ.get("GLIBC_TUNABLES", "")


def would_help(environ: Mapping[str, str], *, mode: str | None, glibc: tuple[int, ...] | None,
               system: str) -> bool:
  """Whether a process started with `environ` gains from the tunable (see the module docstring)."""
  return (system == "Linux" and glibc is not None and glibc >= (2, 35) and mode == "madvise"
          and not tunable_set(environ) and not environ.get(OPT_OUT))


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` with the tunable appended to GLIBC_TUNABLES (":"-separated)."""
  env = dict(environ)
  current = env.get("GLIBC_TUNABLES", "")
  env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
  return env


def status(environ: Mapping[str, str] | None = None) -> str:
  """One line for benchmark records: the THP mode and whether this process asked for huge pages."""
  environ = os.environ if environ is None else environ
  asked = TUNABLE_NAME + (" set" if tunable_set(environ) else " not set")
  return f"THP {thp_mode() or 'unknown'}, {asked}"


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with the tunable set, when that would help.

  Call it first thing in a command's entry point, before anything is printed or started. Returns
  (doing nothing) when it would not help, or when the process cannot be re-executed.
  """
  if not would_help(os.environ, mode=thp_mode(), glibc=glibc_version(), system=platform.system()):
    return
  argv = getattr(sys, "orig_argv", None)
  if not argv or not sys.executable:
    return
  try:
    os.execve(sys.executable, argv, with_tunable(os.environ))
  except OSError:
    return
