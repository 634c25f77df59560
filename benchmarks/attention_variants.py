"""Each attention variant at S = 512, 2048 and 8192 with a real model's heads, on every backend that computes it.

Batch 1, bf16 q/k/v (fp32 with --dtype float32), one layer's attention call as a model makes it (causal where the
model is, the variant's data as the model holds it). Time is the best of --reps calls after a warm-up; peak memory
is the peak of live bytes torch allocated during one call (CPU profiler), inputs excluded. Compiled flex's first
call, which compiles, is timed apart ("compile s"). A cell is skipped, and says why, when its memory estimate
passes --mem-gb (naive's full score and probability matrices) or, for tiled and eager flex, when its estimate of
elementary tiles makes it minutes long.

    python benchmarks/attention_variants.py --reps 3
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from _report import table, write_section
from minibt import attention
from minibt.attention import AttnMask, RelativeBias
from minibt.models.mpnet import mpnet_bucket
from minibt.tools.audit import _peak_live_bytes

# (label, model whose heads are used, Hq, Hkv, D, causal, variants as AttnMask data (made per case))
CASES = [
    ("causal window 128", "gpt-oss-20b", 64, 8, 64, True, lambda h: dict(window=(127, 0))),
    ("causal window 4096", "Mistral-7B", 32, 8, 128, True, lambda h: dict(window=(4095, 0))),
    ("bidirectional window ±64", "ModernBERT-base", 12, 12, 64, False, lambda h: dict(window=(64, 64))),
    ("ALiBi (causal)", "BLOOM-560m", 16, 16, 64, True, lambda h: dict(alibi=torch.tensor(alibi(h)))),
    ("relative buckets", "MPNet-base", 12, 12, 64, False,
     lambda h: dict(relative=RelativeBias(torch.randn(32, h), mpnet_bucket))),
    ("softcap 50 + window 4096", "Gemma-2-2B", 8, 4, 256, True, lambda h: dict(softcap=50.0, window=(4095, 0))),
    ("sinks + window 128", "gpt-oss-20b", 64, 8, 64, True, lambda h: dict(sinks=torch.randn(h), window=(127, 0))),
]


def alibi(heads):
    n = 2 ** math.floor(math.log2(heads))
    return [2 ** (-8 * (i + 1) / n) for i in range(n)] + [2 ** (-8 * (i + 1) / (2 * n)) for i in range(2 * n)][0::2][
        :heads - n]


def skip_reason(name, hq, s, dtype_bytes, mem_gb, window):
    if name == "naive" and 2 * hq * s * s * 4 > mem_gb * 2**30:
        return f"needs ~{2 * hq * s * s * 4 / 2**30:.0f} GB"
    if name == "flex eager" and s > 2048:
        return "minutes (eager: S x S scores)"
    if name == "tiled":
        seen = s if window is None else min(s, sum(w for w in window if w is not None) + 1)
        tiles = hq * (s / 64) * (seen / 64)
        if tiles > 2e5:
            return "minutes (tiles)"
    return None


def timed(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_case(label, model, hq, hkv, d, causal, make, s, dtype, reps, mem_gb):
    torch._dynamo.reset()        # each case is another model: in one process they would add up to dynamo's limit
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, s, d, generator=g).to(dtype)
    k, v = (torch.randn(1, hkv, s, d, generator=g).to(dtype) for _ in range(2))
    data = make(hq)
    mask = AttnMask(causal=causal).with_variants(**data)
    rows = {}
    flex = __import__("minibt.attention.flex_attention", fromlist=["COMPILED"])
    for name in ("naive", "sdpa", "flash", "tiled", "flex", "flex eager"):
        entry = attention.get(name.split()[0])
        if not mask.variants() <= entry.variants:
            continue
        reason = skip_reason(name, hq, s, dtype.itemsize, mem_gb, mask.window)
        if reason:
            rows[name] = (reason, "", "")
            continue
        flex.COMPILED = name == "flex"
        fresh = AttnMask(causal=causal).with_variants(**data)             # a model's first call: nothing cached

        def call(m=fresh):
            with torch.inference_mode():
                return entry.fn(q, k, v, mask=m, scale=d ** -0.5)
        compile_s = ""
        if name == "flex":
            start = time.perf_counter()
            call()
            compile_s = f"{time.perf_counter() - start:.1f}"
        ms = timed(call, reps) * 1e3
        peak = _peak_live_bytes(call) / 2**20
        rows[name] = (f"{ms:.1f}", f"{peak:.0f}", compile_s)
    flex.COMPILED = True
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--mem-gb", type=float, default=6.0)
    p.add_argument("--only", default=None, help="run only cases whose label contains this text")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    dtype = getattr(torch, args.dtype)
    out, notes = [], []
    for label, model, hq, hkv, d, causal, make in CASES:
        if args.only and args.only not in label:
            continue
        for s in map(int, args.lengths.split(",")):
            rows = run_case(label, model, hq, hkv, d, causal, make, s, dtype, args.reps, args.mem_gb)
            sdpa = rows.get("sdpa", ("",))[0]
            for name, (ms, peak, compile_s) in rows.items():
                ratio = f"{float(sdpa) / float(ms):.2f}x" if sdpa.replace(".", "").isdigit() and \
                    ms.replace(".", "").isdigit() else ""
                out.append([label, f"{model} ({hq}/{hkv}x{d})", s, name, ms, peak, compile_s, ratio])
                print(out[-1], flush=True)
            flex_ms, sd = rows.get("flex", ("",))[0], sdpa
            if "window" in label and flex_ms.replace(".", "").isdigit() and sd.replace(".", "").isdigit():
                notes.append(f"{label}, S={s}: compiled flex {float(sd) / float(flex_ms):.2f}x SDPA with a "
                             "materialised mask")
    body = (f"B = 1, {args.dtype}, best of {args.reps} calls; peak = live bytes allocated during one call. "
            "'vs sdpa' = SDPA's time / this backend's (> 1: faster than SDPA with a materialised mask). "
            "`flex` is compiled (its compile time apart); `flex eager` is the documented reading mode.\n\n"
            + table(["variant", "heads (Hq/Hkv x D)", "S", "backend", "ms", "peak MB", "compile s", "vs sdpa"], out)
            + "\n\n" + "\n".join(f"- {n}" for n in notes))
    write_section("attention_variants", body)


if __name__ == "__main__":
    main()
