"""kernels/malloc.py: a freed activation-sized block stays in the process for reuse instead of going back to the OS
(glibc's default, kept unless the caller asks: embed(..., keep_memory=True)). Each case runs in a fresh interpreter because the setting is
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
import sys
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.empty(24 << 20, dtype=torch.uint8)       # a 24 MiB activation, written once
x.fill_(1)
held = resident()
del x
print(applied, sys.argv[1] != "keep" or keep_freed_memory() is applied, (held - resident()) >> 20)
"""


def run(mode: str):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, once, released_mib = out.stdout.split()
    return applied, once, int(released_mib)


def test_freed_activation_stays_for_reuse():
    applied, once, released_mib = run("keep")
    assert (applied, once) == ("True", "True")
    assert released_mib <= 1           # the 24 MiB block stayed resident (within 1 MiB of page-count noise)


def test_opt_out_leaves_glibc_defaults():
    applied, once, released_mib = run("default")
    assert (applied, once) == ("False", "True")
    assert released_mib >= 20          # glibc's default: the block was unmapped on free


def test_embed_changes_nothing_unless_asked(minilm):
    """No process-wide side effect without the caller asking: minibt.embed leaves malloc alone by default."""
    code = ("import minibt, sys; from minibt.kernels import malloc; m = minibt.from_hub(sys.argv[1]); "
            "t = minibt.load_tokenizer(sys.argv[1]); minibt.embed(m, t, ['a']); print(malloc._applied); "
            "minibt.embed(m, t, ['a'], keep_memory=True); print(malloc._applied)")
    out = subprocess.run([sys.executable, "-c", code, str(minilm)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True"]
