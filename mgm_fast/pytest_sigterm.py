"""pytest plugin: SIGTERM (and SIGINT) end the session like Ctrl-C, so reports are still written.

``timeout`` (and most job runners) stop a process with SIGTERM, which kills a Python process
outright: pytest then never reaches ``pytest_sessionfinish``, and neither the junit XML
(``--junitxml``) nor pytest-benchmark's JSON (``--benchmark-json``) is written. With this
plugin the signal raises KeyboardInterrupt in the main thread instead: pytest stops in the
running test, writes its reports and exits with code 2. After such a signal the
pytest-benchmark JSON holds only the benchmarks whose test passed: the one that was
interrupted is left out (pytest-benchmark 5.3 cannot even write its JSON when the interrupted
benchmark has no finished round). Further SIGTERMs are ignored while the reports are written
(SIGKILL still stops it). SIGINT gets Python's default handler back, in case it was inherited
as ignored (a command started in the background of a non-interactive shell ignores SIGINT).

    python -m pytest -p mgm_fast.pytest_sigterm ...

``benchmarks/gpu_suite.sh`` passes it to every pytest it runs, so a stage cut by its time
limit still leaves the results of the tests and benchmarks that finished.
"""

from __future__ import annotations

import signal
import threading

import pytest

_STATE: dict = {"signal": None, "passed": set()}


def _interrupt(signum, frame):
    # a second SIGTERM (an outer time limit firing too) must not cut the report writing short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _STATE["signal"] = signum
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def _sigint(signum, frame):
    _STATE["signal"] = signum
    raise KeyboardInterrupt


def pytest_configure(config):
    _STATE["signal"] = None
    _STATE["passed"] = set()
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _sigint)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _STATE["passed"].add(report.nodeid)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    benchmarks = getattr(session.config, "_benchmarksession", None)
    if _STATE["signal"] is not None and benchmarks is not None and isinstance(benchmarks.benchmarks, list):
        benchmarks.benchmarks[:] = [
            b for b in benchmarks.benchmarks if b and getattr(b, "fullname", None) in _STATE["passed"]
        ]
    yield
