"""The test suite's own scheduling: tests that share an expensive fixture run on one xdist worker.

`make test` runs `pytest -n 2 --dist loadgroup`; tests/conftest.py groups each module whose tests use a
module-scoped fixture, and the pipeline tests share the session-scoped `mini_demo`. If the pytest /
pytest-xdist pair stops honouring groups (pytest 9 with xdist 3.8 did), every such fixture is built on
both workers: minutes of extra test time and no failure anywhere else. Also the session's default
mesh: one of the 4 CPU devices unless a test is marked `all_devices` (tests/conftest.py).
"""

import subprocess
import sys
import textwrap

import pytest


def test_grouped_tests_run_on_one_worker(tmp_path):
  (tmp_path / "conftest.py").write_text("")
  (tmp_path / "test_grouped.py").write_text(textwrap.dedent("""
      import os
      import pytest

      pytestmark = pytest.mark.xdist_group(name="g")

      @pytest.mark.parametrize("i", range(6))
      def test_a(i):
        with open(os.path.join(os.path.dirname(__file__), f"worker{i}"), "w") as f:
          f.write(os.environ["PYTEST_XDIST_WORKER"])
      """))
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                           "--dist", "loadgroup", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  workers = {(tmp_path / f"worker{i}").read_text() for i in range(6)}
  assert len(workers) == 1, f"one group ran on {sorted(workers)}"


def test_trainer_meshes_span_one_device_unless_marked():
  from jaxldm.train import common

  assert common.make_mesh(0).devices.size == 1 and common.make_mesh(2).devices.size == 2


@pytest.mark.all_devices
def test_marked_tests_get_every_device():
  import jax

  from jaxldm.train import common

  assert common.make_mesh(0).devices.size == len(jax.devices()) == 4
