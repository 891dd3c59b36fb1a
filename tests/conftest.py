"""A deadline for every test phase (setup, call, teardown), so that the suite fails instead
of hanging: PCR_TEST_TIMEOUT seconds (default 600; the slowest test takes about a tenth of
that). At the deadline every thread's stack is printed and the phase fails with a
TimeoutError raised in the main thread; the helpers of tests/children.py then kill their
children on the way out. A main thread stuck in C code that never returns to Python is
ended 60 s later by faulthandler, with the stacks: the run fails, it does not hang.
The tests that start processes have their own, shorter deadlines (tests/children.py)."""
import contextlib
import faulthandler
import os
import signal
import sys

import pytest

LIMIT = float(os.environ.get("PCR_TEST_TIMEOUT", "600"))


@contextlib.contextmanager
def deadline(item, phase, limit=LIMIT):
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        raise TimeoutError(f"{item.nodeid}: {phase} still running after {limit:g} s "
                           f"(PCR_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + 60, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with deadline(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with deadline(item, "call"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    with deadline(item, "teardown"):
        yield
