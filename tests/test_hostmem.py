"""Huge pages for XLA:CPU's buffers: when the `jaxldm` command asks for them, and that it does."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from jaxldm import hostmem

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINUX = dict(mode="madvise", glibc=(2, 36), system="Linux")


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("garbage\n", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hostmem.thp_mode(str(path)) == mode
  assert hostmem.thp_mode(str(tmp_path / "missing")) is None


def test_would_help_only_where_the_tunable_changes_something():
  assert hostmem.would_help({}, **LINUX)
  assert hostmem.would_help({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, **LINUX)
  assert not hostmem.would_help({"GLIBC_TUNABLES": hostmem.TUNABLE}, **LINUX)  # Already asked: no loop.
  assert not hostmem.would_help({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **LINUX)  # The user's choice.
  assert not hostmem.would_help({hostmem.OPT_OUT: "1"}, **LINUX)
  assert not hostmem.would_help({}, **{**LINUX, "mode": "always"})  # Huge pages without asking.
  assert not hostmem.would_help({}, **{**LINUX, "mode": "never"})
  assert not hostmem.would_help({}, **{**LINUX, "mode": None})
  assert not hostmem.would_help({}, **{**LINUX, "glibc": (2, 31)})  # No such tunable before 2.35.
  assert not hostmem.would_help({}, **{**LINUX, "glibc": None})
  assert not hostmem.would_help({}, **{**LINUX, "system": "Darwin"})


def test_with_tunable_keeps_the_users_tunables():
  assert hostmem.with_tunable({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": hostmem.TUNABLE}
  env = hostmem.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.check=0"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.check=0:{hostmem.TUNABLE}"
  assert hostmem.tunable_set(env)


def _bench_host(env: dict[str, str], command: tuple[str, ...] = ("-m", "jaxldm.cli")) -> str:
  proc = subprocess.run([sys.executable, *command, "bench", "host"], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("huge pages")]
  return line


def test_the_command_reexecutes_itself_with_the_tunable_where_it_helps():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
  helps = hostmem.would_help(env, mode=hostmem.thp_mode(), glibc=hostmem.glibc_version(), system=platform.system())
  # The command ran to its end after the re-execution (same arguments), with the tunable set iff it helps.
  assert _bench_host(env).endswith("hugetlb set" if helps else "hugetlb not set")
  assert _bench_host({**env, hostmem.OPT_OUT: "1"}).endswith("hugetlb not set")
  assert _bench_host({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}).endswith("hugetlb set")  # Left as given.


def test_a_script_calling_main_is_never_reexecuted(tmp_path):
  # Re-executing it would run the user's script again from its first line: only the command itself may.
  script = tmp_path / "wrapper.py"
  script.write_text("import sys\nfrom jaxldm.cli import main\nsys.exit(main())\n")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
  assert _bench_host(env, (str(script),)).endswith("hugetlb not set")
