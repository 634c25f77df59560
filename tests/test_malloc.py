"""kernels/malloc.py: a freed activation-sized block stays in the process for reuse instead of going back to the OS
(glibc's default, which MINIBT_KEEP_MEMORY=0 keeps). Each case runs in a fresh interpreter because the setting is
process-wide. What keeping it buys (page faults avoided, texts/s) is measured, not asserted: see the module."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                                reason="mallopt is glibc's; resident memory is read from /proc")

PROBE = """
import torch
from minibt.kernels.malloc import keep_freed_memory
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
applied = keep_freed_memory()
x = torch.empty(24 << 20, dtype=torch.uint8)       # a 24 MiB activation, written once
x.fill_(1)
held = resident()
del x
print(applied, keep_freed_memory() is applied, (held - resident()) >> 20)
"""


def run(keep: str | None):
    env = {k: v for k, v in os.environ.items() if k != "MINIBT_KEEP_MEMORY"}
    if keep is not None:
        env["MINIBT_KEEP_MEMORY"] = keep
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, once, released_mib = out.stdout.split()
    return applied, once, int(released_mib)


def test_freed_activation_stays_for_reuse():
    assert run(None) == ("True", "True", 0)


def test_opt_out_leaves_glibc_defaults():
    applied, once, released_mib = run("0")
    assert (applied, once) == ("False", "True")
    assert released_mib >= 20          # glibc's default: the block was unmapped on free
