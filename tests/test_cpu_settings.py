"""The process settings a routed model needs on the CPU (`rmn_fx.cpu_settings`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rmn_fx.cli import main
from rmn_fx.cpu_settings import PRIMITIVE_CACHE_VARIABLE, ROUTED_PRIMITIVE_CACHE, reserve_primitive_cache, runs_on_glibc


def test_the_primitive_cache_is_reserved_unless_the_environment_sets_it(monkeypatch):
    monkeypatch.delenv(PRIMITIVE_CACHE_VARIABLE, raising=False)
    assert reserve_primitive_cache(3000) == 3000
    assert reserve_primitive_cache(5000) == 3000  # the value in effect is the first one set
    monkeypatch.setenv(PRIMITIVE_CACHE_VARIABLE, "512")
    assert reserve_primitive_cache() == 512


def test_every_cli_command_reserves_it_first(monkeypatch):
    monkeypatch.delenv(PRIMITIVE_CACHE_VARIABLE, raising=False)
    assert main(["--version"]) == 0
    assert os.environ[PRIMITIVE_CACHE_VARIABLE] == str(ROUTED_PRIMITIVE_CACHE)


PAGE_FAULTS = """
import ctypes, resource, sys
from rmn_fx.cpu_settings import keep_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
SIZE = 64 << 20  # an activation at batch 64

def faults_of_a_second_block():
    for step in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_second_block()
print(keep_freed_memory(), file=sys.stderr)
print(default, faults_of_a_second_block())
"""


@pytest.mark.skipif(not runs_on_glibc(), reason="a setting of glibc's malloc")
def test_kept_freed_memory_is_not_page_faulted_in_again():
    """glibc unmaps a freed 64 MB block, so the next one faults its 16k pages in anew; once
    freed memory is kept, the next block reuses the freed one's pages."""
    done = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    default, kept = map(int, done.stdout.split())
    assert default > 10_000 and kept < 1_000, (default, kept)
