"""kernels/malloc.py: with the setting, the freed multi-MB activations of one forward are reused by the next without
fresh page faults; without it (MINIBT_KEEP_MEMORY=0) glibc gives them back to the OS and the next forward faults
their pages in again. Each case runs in a fresh interpreter because the setting is process-wide."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

PROBE = """
import resource, torch
from minibt.kernels.malloc import keep_freed_memory
applied = keep_freed_memory()
def faults_of_one_forward(mib):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    acts = [torch.empty(mib << 20, dtype=torch.uint8) for _ in range(4)]     # 4 activations of this batch's size
    for a in acts:
        a.fill_(1)
    del acts, a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_one_forward(mib) for mib in [12, 6, 9] * 5]            # batches of varying size, as in embed
print(applied, keep_freed_memory() is applied, sum(faults[-6:]))           # the steady state: the last 6 forwards
"""


def run(env_value):
    env = {k: v for k, v in os.environ.items() if k != "MINIBT_KEEP_MEMORY"}
    if env_value is not None:
        env["MINIBT_KEEP_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, once, faults = out.stdout.split()
    return applied, once, int(faults)


def test_freed_activation_is_reused_without_page_faults():
    applied, once, faults = run(None)
    assert (applied, once) == ("True", "True")
    assert faults < 256, faults         # one 6 MiB activation in fresh 4 KiB pages would be 1536 faults


def test_opt_out_leaves_glibc_defaults():
    applied, once, faults = run("0")
    assert (applied, once) == ("False", "True")
    assert faults > 3000, faults        # the default: glibc trimmed the freed heap top, the pages fault in again
