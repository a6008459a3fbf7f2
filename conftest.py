"""pytest-wide: a line on the terminal every minute while one test runs long, for `tests` and `bench`.

A CI log that says nothing for many minutes looks hung (issue 29 saw a 23-minute silent stretch).
pytest captures file descriptors 1 and 2 while a test runs, so the line is written to a copy of
the original stderr taken at configure time, when capturing is suspended.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

HEARTBEAT_ENV = "GRADMAP_TEST_HEARTBEAT_S"
_stderr_fd: list[int] = []


def pytest_configure(config: pytest.Config) -> None:
    if not _stderr_fd:
        _stderr_fd.append(os.dup(2))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    every = float(os.environ.get(HEARTBEAT_ENV, "60"))
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every):
            line = f"\n[still running {item.nodeid}: {time.monotonic() - start:.0f} s]\n"
            os.write(_stderr_fd[0], line.encode())

    thread = threading.Thread(target=beat, name="test-heartbeat", daemon=True)
    if every > 0 and _stderr_fd:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join()
