"""Whole test files on one pytest-xdist worker, on every pytest version.

Some test files build costly module-scoped fixtures (real child processes
killed and restarted, trainings in every backend). Spread over two workers,
each worker would build them again (the resume runs: 240 s on each).

xdist's own `xdist_group` mark does not hold on pytest >= 9.2: its
`--dist loadgroup` rewrites `item._nodeid`, which pytest 9.2 no longer
reads (pytest-dev/pytest-xdist#1386, open), so the mark is silently
ignored and the files are spread test by test. This module keeps the same
command-line (`--dist loadgroup`) and groups by file instead: a scheduler
whose work unit is the whole file for the files named, and a single test
for all others. It uses xdist's scheduler hook and its loadgroup class
(which honours the mark where it works); the nodeids are not touched.
"""

import pytest


def one_worker_files_hook(files):
    """A `pytest_xdist_make_scheduler` hook: under `--dist loadgroup`, each
    file named in `files` (base names, e.g. "test_resume.py") runs whole on
    one worker; every other test is its own work unit, as in `--dist load`.

    Args:
        files: base names of the test files to keep on one worker.

    Returns:
        The hook function, to bind in a conftest.py under its hook name.
    """
    files = frozenset(files)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadGroupScheduling

        class OneWorkerFiles(LoadGroupScheduling):
            def _split_scope(self, nodeid):
                path = nodeid.split("::", 1)[0]
                if path.rsplit("/", 1)[-1] in files:
                    return path
                return super()._split_scope(nodeid)

        return OneWorkerFiles(config, log)

    return pytest_xdist_make_scheduler
