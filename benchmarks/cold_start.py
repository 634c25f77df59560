"""Cold start to the first vector: a fresh process imports, loads the bundled all-MiniLM-L6-v2 and embeds one text.
minibt (Encoder) vs sentence-transformers, alternating, repeated; medians. minibt's share is split into import torch,
minibt's own imports, load, tokenizer, the first embed (issue 26: where the time goes beyond `import torch`)."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _report import table, write_section

MINIBT = """
import time, json; t0 = time.perf_counter()
import torch; t1 = time.perf_counter()
import minibt, minibt.encoder; t2 = time.perf_counter()
from minibt.loading import load; from minibt.tokenizer import load_tokenizer; from minibt.embedding import Pipeline, embed
folder = minibt.bundled_model(); m = load(folder, head="base"); t3 = time.perf_counter()
tok = load_tokenizer(folder); p = Pipeline.read(m.source, m.config.hidden_size); t4 = time.perf_counter()
v = embed(m, tok, ["hello world"], pipeline=p); t5 = time.perf_counter()
print(json.dumps(dict(torch=t1 - t0, imports=t2 - t1, load=t3 - t2, tokenizer=t4 - t3, first=t5 - t4)))
"""
ST = """
import minibt
from sentence_transformers import SentenceTransformer
v = SentenceTransformer(str(minibt.bundled_model()), device="cpu").encode(["hello world"])
"""


def run(code: str) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    return wall, json.loads(last) if last.startswith("{") else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    walls = {"minibt": [], "sentence-transformers": []}
    parts = []
    for _ in range(args.reps):
        wall, split = run(MINIBT)
        walls["minibt"].append(wall)
        parts.append(split)
        walls["sentence-transformers"].append(run(ST)[0])
    med = {k: statistics.median(v) for k, v in walls.items()}
    split = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    rows = [[k, f"{v:.2f}", f"{v / med['sentence-transformers']:.2f}x"] for k, v in med.items()]
    ours = sum(v for k, v in split.items() if k != "torch")
    body = (table(["process: import + load + one vector", "wall s (median)", "vs sentence-transformers"], rows)
            + f"\n\nminibt's process, inside (medians, s): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
            + f"; everything but `import torch`: {ours:.2f} s. The rest of the wall time is the interpreter's start "
            "and exit.\n\n"
            f"- cold start {med['minibt'] / med['sentence-transformers']:.2f}x sentence-transformers (goal <= 0.3x: "
            f"{'met' if med['minibt'] <= 0.3 * med['sentence-transformers'] else 'MISSED'})")
    write_section("cold_start", body)


if __name__ == "__main__":
    main()
