"""Which tests run on which Keras backend: one rule, read from markers.

The test command (tests/run_all.sh) collects the whole suite once per
backend and lets these markers choose; it keeps no lists of files or test
ids, so a test file added or renamed runs on every backend it is marked for.

- `@pytest.mark.backends("tensorflow", "jax", "torch")` (on a test, or as a
  module's `pytestmark`) names the backends a test runs on. The closest
  marker wins: a test's own marker overrides its module's. A test with no
  such marker runs on TensorFlow alone, the stage that runs the whole suite.
- `@pytest.mark.oldest_keras("tensorflow", "torch")` marks the tests that
  run again at the oldest declared Keras (those that touch Keras internals),
  on the backends named (none named: TensorFlow), among those its
  `backends` marker allows. Only they run under `--oldest-keras`.

A backend name that is not one of BACKENDS stops the collection with a
usage error, so a typo cannot drop a test silently.
"""

import pytest

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_BACKENDS = ("tensorflow",)
OLDEST_OPTION = "--oldest-keras"


def _backends(item, name):
    """The backend names of `item`'s closest marker `name`, None if none."""
    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    unknown = [b for b in marker.args if b not in BACKENDS]
    if unknown or marker.kwargs:
        raise pytest.UsageError(
            f"{item.nodeid}: `@pytest.mark.{name}` takes backend names "
            f"among {BACKENDS}. Received: args={marker.args}, "
            f"kwargs={marker.kwargs}")
    return marker.args or DEFAULT_BACKENDS


def runs_on(item, backend, oldest=False):
    """Whether test `item` runs on `backend` (at the oldest Keras when
    `oldest`), by its `backends` and `oldest_keras` markers."""
    backends = _backends(item, "backends") or DEFAULT_BACKENDS
    if oldest:
        oldest_backends = _backends(item, "oldest_keras")
        if oldest_backends is None:
            return False
        backends = [b for b in backends if b in oldest_backends]
    return backend in backends


def backend_selection_hooks(backend):
    """The conftest hooks of the rule above.

    Args:
        backend: a function of no argument that returns the backend the
            suite runs on (`keras.backend.backend`).

    Returns:
        A dict of hook functions by hook name, to bind in a conftest.py
        (`globals().update(...)`).
    """

    def pytest_addoption(parser):
        parser.addoption(
            OLDEST_OPTION, action="store_true", default=False,
            help="run only the tests marked oldest_keras for this backend "
                 "(the stage at the oldest declared Keras)")

    def pytest_configure(config):
        config.addinivalue_line(
            "markers", "backends(*names): the Keras backends the test runs "
                       "on (unmarked: tensorflow alone)")
        config.addinivalue_line(
            "markers", "oldest_keras(*names): the test runs again at the "
                       "oldest declared Keras, on these backends (none "
                       "named: tensorflow)")

    def pytest_collection_modifyitems(config, items):
        name, oldest = backend(), config.getoption(OLDEST_OPTION)
        keep = [item for item in items if runs_on(item, name, oldest)]
        if len(keep) < len(items):
            kept = set(map(id, keep))
            config.hook.pytest_deselected(
                items=[item for item in items if id(item) not in kept])
            items[:] = keep

    return {
        "pytest_addoption": pytest_addoption,
        "pytest_configure": pytest_configure,
        "pytest_collection_modifyitems": pytest_collection_modifyitems,
    }
