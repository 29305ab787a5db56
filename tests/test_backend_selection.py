"""The markers choose which tests run on which backend (_backend_selection.py):
tests/run_all.sh collects the whole suite on each backend and keeps no list
of files.

A real pytest collects a small project in a child process, once per backend,
at the newest and at the oldest Keras (`--oldest-keras`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = """
import os

from _backend_selection import backend_selection_hooks

globals().update(backend_selection_hooks(lambda: os.environ["KERAS_BACKEND"]))
"""

PLAIN = """
import pytest


def test_unmarked():
    pass


@pytest.mark.backends("jax")
def test_jax_alone():
    pass


@pytest.mark.oldest_keras()
def test_internals():
    pass
"""

MARKED_MODULE = """
import pytest

pytestmark = [
    pytest.mark.backends("tensorflow", "jax", "torch"),
    pytest.mark.oldest_keras("tensorflow", "torch"),
]


def test_everywhere():
    pass


@pytest.mark.backends("tensorflow")  # the closest marker wins
def test_tensorflow_machinery():
    pass


@pytest.mark.backends("torch")
@pytest.mark.oldest_keras("torch")
def test_torch_step():
    pass
"""


def _collected(project, backend, *args):
    """The test names pytest collects in `project` on `backend`."""
    env = dict(os.environ, KERAS_BACKEND=backend,
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "--collect-only", "-c", os.devnull, *args, str(project)],
        cwd=project, env=env, capture_output=True, text=True, timeout=120)
    return result, sorted(line.split("::")[-1] for line in result.stdout.splitlines()
                          if "::" in line)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_plain.py").write_text(PLAIN)
    (tmp_path / "test_marked.py").write_text(MARKED_MODULE)
    return tmp_path


@pytest.mark.parametrize("backend, oldest, expected", [
    ("tensorflow", False, ["test_everywhere", "test_internals",
                           "test_tensorflow_machinery", "test_unmarked"]),
    ("jax", False, ["test_everywhere", "test_jax_alone"]),
    ("torch", False, ["test_everywhere", "test_torch_step"]),
    ("tensorflow", True, ["test_everywhere", "test_internals",
                          "test_tensorflow_machinery"]),
    ("torch", True, ["test_everywhere", "test_torch_step"]),
    ("jax", True, []),
])
def test_markers_choose_the_tests_of_each_backend(project, backend, oldest, expected):
    result, names = _collected(project, backend, *(["--oldest-keras"] if oldest else []))
    assert result.returncode in (0, 5), result.stdout[-3000:] + result.stderr[-3000:]
    assert names == expected


def test_an_unknown_backend_name_stops_the_collection(project):
    (project / "test_typo.py").write_text(
        "import pytest\n\n\n@pytest.mark.backends('tensorflow', 'pytorch')\n"
        "def test_typo():\n    pass\n")
    result, _ = _collected(project, "torch")
    assert result.returncode == 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("test_typo.py::test_typo: `@pytest.mark.backends` takes backend names "
            "among ('tensorflow', 'jax', 'torch'). Received: "
            "args=('tensorflow', 'pytorch'), kwargs={}") in result.stdout + result.stderr
