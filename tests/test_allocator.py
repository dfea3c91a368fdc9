"""harden.allocator: a freed large block is reused without faulting its pages in again, and the CLI asks for it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harden.allocator import ENV

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="the settings are glibc's")

# Faults taken while a 64 MiB array (over glibc's largest mmap threshold) is made again after one was freed.
REUSE = """
import resource, sys
import numpy as np
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(2**24, dtype=np.float32)
del a
before = faults()
a = np.ones(2**24, dtype=np.float32)
print(faults() - before)
"""


def _reuse_faults(setup: str, opt_out: bool = False) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if opt_out:
        env[ENV] = "default"
    done = subprocess.run([sys.executable, "-c", REUSE.format(setup=setup)], env=env, capture_output=True,
                          text=True, check=True)
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]), "\n".join(lines[:-1])


@glibc
def test_kept_memory_is_reused_without_faults() -> None:
    default, _ = _reuse_faults("")
    kept, said = _reuse_faults("from harden.allocator import keep_freed_memory\nprint(keep_freed_memory())")
    assert said == "True"
    assert default > 0  # glibc's defaults unmap the block and fault it in again
    assert kept * 10 < default


@glibc
def test_opting_out_leaves_the_defaults() -> None:
    default, _ = _reuse_faults("")
    opted, said = _reuse_faults("from harden.allocator import keep_freed_memory\nprint(keep_freed_memory())",
                                opt_out=True)
    assert said == "False"
    assert opted * 2 > default


@glibc
def test_the_command_keeps_freed_memory() -> None:
    kept, _ = _reuse_faults("from harden.cli import main\nmain([])")
    default, _ = _reuse_faults("")
    assert kept * 10 < default
