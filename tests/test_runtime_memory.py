"""The runtime fixes glibc's mmap threshold (heap fragmentation grew a compare run to 22 GiB)."""
import platform
import sys

import pytest

from gradmap.runtime.memory import limit_heap_fragmentation


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt(M_MMAP_THRESHOLD) is a glibc interface")
def test_threshold_set_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert limit_heap_fragmentation() is True


def test_user_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_heap_fragmentation() is False
