"""The seed experiment on our code: bert-base-shaped encoder, minibt backends vs transformers, time vs padding.

Writes the "encoder_padding" section of docs/benchmarks.md: the tables, goal checks (ratios to transformers sdpa in
the same run; useful GFLOP/s vs the matmul peak measured in the same run) and whether `auto` stays within 5% of
the best fixed backend at every point.
"""
from __future__ import annotations

import argparse

import torch

import hf_contenders
from _report import write_section
from minibt.tools import bench

GOALS = {0.0: 1.0, 0.5: 1.8, 0.75: 3.6}
FIXED = ("sdpa", "varlen", "fused")


def check(rows) -> list[str]:
    notes = []
    points = sorted({(r["batch"], r["length"], r["padding"]) for r in rows})
    for b, s, p in points:
        at = {r["contender"]: r for r in rows if (r["batch"], r["length"], r["padding"]) == (b, s, p)}
        best_name = min((f"minibt {n}" for n in FIXED if f"minibt {n}" in at), key=lambda n: at[n]["ms"])
        auto = at.get("minibt auto")
        line = f"B{b} S{s} pad {p:.2f}: best fixed {best_name} {at[best_name]['speedup']:.2f}x"
        if auto:
            gap = auto["ms"] / at[best_name]["ms"] - 1
            line += f"; auto {auto['speedup']:.2f}x ({'+' if gap >= 0 else ''}{100 * gap:.0f}% time vs best: " \
                    f"{'ok' if gap <= 0.05 else 'MISSED (>5%)'})"
        if p in GOALS:
            line += f"; goal >= {GOALS[p]}x: {'met' if at[best_name]['speedup'] >= GOALS[p] else 'MISSED'}"
        notes.append("- " + line)
    return notes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="B8 S128 fp32 only")
    args = ap.parse_args()
    runs = [("B8 S128, fp32", dict(batches=(8,), lengths=(128,), paddings=(0, 0.1, 0.2, 0.5, 0.75), dtype=torch.float32))]
    if not args.quick:
        runs += [("B8 S128, bf16", dict(batches=(8,), lengths=(128,), paddings=(0, 0.1, 0.2, 0.5, 0.75),
                                        dtype=torch.bfloat16)),
                 ("B16 S256, fp32", dict(batches=(16,), lengths=(256,), paddings=(0, 0.5, 0.75), dtype=torch.float32))]
    body = ["bert-base shape (random weights, the same for every contender), `transformers` eager and sdpa in the "
            "same run. Contenders run interleaved, median of the repetitions."]
    for title, kw in runs:
        rows, peak = bench.run("bert-base", backends=FIXED + ("auto",), reps=args.reps,
                               others=hf_contenders.contenders, **kw)
        body += [f"### {title}", "", bench.markdown(rows, peak, kw["dtype"]), "", *check(rows), ""]
    write_section("encoder_padding", "\n".join(body))


if __name__ == "__main__":
    main()
