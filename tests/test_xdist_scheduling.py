"""The suite's `--dist loadgroup` keeps each file of conftest.ONE_WORKER_FILES
on one xdist worker (its module-scoped fixture built once) and spreads the
other tests over both workers, on the installed pytest (pytest >= 9.2 drops
xdist's own `xdist_group` mark: _xdist_scheduling.py).

A real `pytest -n 2` runs a small project in a child process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("xdist")

TESTS = Path(__file__).resolve().parent

CONFTEST = """
from _xdist_scheduling import one_worker_files_hook

pytest_xdist_make_scheduler = one_worker_files_hook(["test_costly.py"])
"""

# Each test records the worker it ran on, and the module fixture records
# each time it is built, in files named after the worker and the test. The
# tests of test_plain.py wait for each other across the workers, so they pass
# only if both workers run some of them, however loaded the machine.
LOGGED = """
import os
import time

import pytest

WORKER = os.environ["PYTEST_XDIST_WORKER"]
LOG = os.environ["SCHEDULING_LOG"]


def _log(what):
    with open(os.path.join(LOG, f"{{what}}-{{WORKER}}-{{time.time_ns()}}"), "w"):
        pass


@pytest.fixture(scope="module")
def costly():
    _log("{name}_fixture")


@pytest.mark.parametrize("i", range(12))
def test_it(costly, i):
    _log("{name}_test")
    if "{name}" == "plain":
        # Waits until the other worker has run a test of this file too: a
        # file kept whole on one worker would never get there (timeout).
        deadline = time.time() + 120
        while not any(n.startswith("plain_test-") and f"-{{WORKER}}-" not in n
                      for n in os.listdir(LOG)):
            assert time.time() < deadline, "the other worker ran no test of this file"
            time.sleep(0.02)
"""


def test_named_file_runs_on_one_worker_and_the_rest_on_both(tmp_path):
    project, log = tmp_path / "project", tmp_path / "log"
    project.mkdir()
    log.mkdir()
    (project / "conftest.py").write_text(CONFTEST)
    for name in ("costly", "plain"):
        (project / f"test_{name}.py").write_text(textwrap.dedent(
            LOGGED.format(name=name)))
    env = dict(os.environ, SCHEDULING_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "-n", "2", "--dist", "loadgroup", "-c", os.devnull, str(project)],
        cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "24 passed" in result.stdout

    def workers(what):
        return [name.split("-")[1] for name in os.listdir(log)
                if name.startswith(what + "-")]

    # The named file: one worker ran all 12 tests, its fixture built once.
    assert len(workers("costly_test")) == 12
    assert len(set(workers("costly_test"))) == 1
    assert workers("costly_fixture") == workers("costly_test")[:1]
    # The other file's tests are single work units, spread over both.
    assert len(workers("plain_test")) == 12
    assert set(workers("plain_test")) == {"gw0", "gw1"}
    assert len(workers("plain_fixture")) == 2
