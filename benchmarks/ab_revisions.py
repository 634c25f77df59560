"""Before/after in one run: the same minibt workloads on two git revisions of this repository, interleaved.

A refactor must not make anything slower, and only ratios measured in the same run on the same machine mean
anything here. Each revision is checked out once into a temporary worktree; each workload then runs in a fresh
subprocess per revision and round (ABAB...), with that worktree first on PYTHONPATH, and the median is reported.

Workloads (the paths a forward and a load take):
- encoder: bert-base-shaped random encoder, B8 S128, fp32 and bf16, at 0% and 50% padding, `auto`
- minilm embed: the real all-MiniLM-L6-v2 embedding 2,000 real texts (tests/real_corpus.py), fp32
- prefill / decode: the real SmolLM2-135M (tests/smollm2_fixture.py), B1 and B4, fp32 and bf16
- load: from_hub of SmolLM2 (fp32) and of all-MiniLM-L6-v2

    python benchmarks/ab_revisions.py --before c49ceda --after HEAD --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import table, test_module, write_section

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
import minibt
from minibt.hub import bundled_model
workload, arg = sys.argv[1], json.loads(sys.argv[2])

def best(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

if workload == "encoder":
    from minibt.models.bert import Bert, BertConfig
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                     **({"add_pooling_layer": False} if "add_pooling_layer" in BertConfig.__dataclass_fields__ else {}))
    model = Bert(cfg).to(getattr(torch, arg["dtype"])).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (8, 128), generator=g)
    mask = torch.ones(8, 128, dtype=torch.long)
    n = int(128 * (1 - arg["padding"]))
    mask[:, n:] = 0
    with torch.inference_mode():
        t = best(lambda: model(ids, attention_mask=mask), 5)
elif workload == "embed":
    from real_corpus import stdlib_corpus
    texts = stdlib_corpus(2000)
    model, tok = minibt.from_hub(bundled_model()), minibt.load_tokenizer(bundled_model())
    t = best(lambda: minibt.embed(model, tok, texts), 2)
elif workload in ("prefill", "decode"):
    model = minibt.from_hub(arg["folder"], dtype=getattr(torch, arg["dtype"]))
    tok = minibt.load_tokenizer(arg["folder"])
    b, length = arg["batch"], 128
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(b):
        mask[i, :i * 16] = 0                                   # ragged, left-padded
    new = 1 if workload == "prefill" else 33
    gen = lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    t = best(gen, 3)
    if workload == "decode":
        t = (t - best(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[]), 3)) / 32
elif workload == "load":
    folder = arg["folder"] or str(bundled_model())
    t = best(lambda: minibt.from_hub(folder), 3)
print(json.dumps(t))
"""


def workloads(smollm2: str) -> list[tuple[str, str, dict]]:
    out = []
    for dtype in ("float32", "bfloat16"):
        for padding in (0.0, 0.5):
            out.append((f"encoder B8 S128 {dtype} pad {padding:.0%}", "encoder", dict(dtype=dtype, padding=padding)))
    out.append(("minilm embed 2,000 texts", "embed", dict()))
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 4):
            for kind in ("prefill", "decode"):
                out.append((f"SmolLM2 {kind} B{batch} {dtype}", kind, dict(folder=smollm2, dtype=dtype, batch=batch)))
    out.append(("load SmolLM2", "load", dict(folder=smollm2)))
    out.append(("load all-MiniLM-L6-v2", "load", dict(folder=None)))
    return out


def worktree(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev], check=True,
                   capture_output=True)
    return into


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="HEAD~1")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default=None, help="run only workloads whose label contains this text")
    args = p.parse_args()
    smollm2 = str(test_module("smollm2_fixture").build_smollm2())
    tmp = Path(tempfile.mkdtemp(prefix="minibt-ab-"))
    trees = {}
    try:
        for side, rev in (("before", args.before), ("after", args.after)):
            sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                                 capture_output=True, text=True).stdout.strip()
            trees[side] = (sha, worktree(sha, tmp / side))
        rows = []
        for label, kind, arg in workloads(smollm2):
            if args.only and args.only not in label:
                continue
            times = {"before": [], "after": []}
            for _ in range(args.rounds):
                for side in ("before", "after"):
                    path = os.pathsep.join([str(trees[side][1]), str(ROOT / "tests")])      # that revision first
                    out = subprocess.run([sys.executable, "-c", PROBE, kind, json.dumps(arg)], check=True,
                                         capture_output=True, text=True, env=os.environ | {"PYTHONPATH": path}).stdout
                    times[side].append(json.loads(out.strip().splitlines()[-1]))
            before, after = statistics.median(times["before"]), statistics.median(times["after"])
            rows.append([label, f"{before * 1e3:.1f}", f"{after * 1e3:.1f}", f"{before / after:.3f}x"])
            print(rows[-1], flush=True)
    finally:
        for side in trees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[side][1])],
                           capture_output=True)
    body = (f"Before: {trees['before'][0]}, after: {trees['after'][0]}; median of {args.rounds} interleaved rounds, "
            "each a fresh process (min of its repetitions). Speed ratio > 1: the after revision is faster.\n\n"
            + table(["workload", f"{trees['before'][0]} ms", f"{trees['after'][0]} ms", "before / after"], rows))
    write_section("ab_revisions", body)


if __name__ == "__main__":
    main()
