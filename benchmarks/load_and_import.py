"""Import time, load time and peak RSS of minibt vs transformers on the real all-MiniLM-L6-v2, in one run.

Each measurement runs in a fresh subprocess (imports and page cache are per-process), alternating minibt and
transformers, repeated; the median is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from _report import table, write_section

# `import minibt` alone is lazy (no torch); minibt.loading brings torch and the model code, as transformers.BertModel
# brings transformers' model code: the two sides import what a load needs.
IMPORT = {
    "minibt": "import minibt, minibt.loading",
    "transformers": "import transformers; transformers.BertModel",
}
LOAD = {
    "minibt": ("import minibt, minibt.loading", "m = minibt.from_hub(path)"),
    "transformers": ("import transformers; transformers.AutoModel", "m = transformers.AutoModel.from_pretrained(path)"),
}

PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
{setup}
t1 = time.perf_counter()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path = sys.argv[1]
t2 = time.perf_counter()
{load}
t3 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{use}
used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"import": t1 - t0, "load": t3 - t2, "rss_over_base_mb": (peak - base) / 1024,
                  "rss_used_mb": (used - base) / 1024}}))
"""


# First use: the first forward after loading.
USE = ("import torch\nwith torch.inference_mode():\n"
       "    m(torch.full((1, 16), 2000), attention_mask=torch.ones(1, 16, dtype=torch.long))")


def probe(setup, load, path, use=USE):
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup, load=load, use=use), str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from minibt.hub import bundled_model
    path = bundled_model()
    size_mb = (path / "model.safetensors").stat().st_size / 2**20
    runs = {name: {"import": [], "load": [], "rss": [], "used": []} for name in IMPORT}
    probe(LOAD["minibt"][0], LOAD["minibt"][1], path)             # warm the page cache for both
    for _ in range(args.repeat):
        for name in IMPORT:                                      # interleaved: noise hits both sides alike
            r = probe(IMPORT[name], "pass", path, use="pass")
            runs[name]["import"].append(r["import"])
            r = probe(*LOAD[name], path)
            runs[name]["load"].append(r["load"])
            runs[name]["rss"].append(r["rss_over_base_mb"])
            runs[name]["used"].append(r["rss_used_mb"])
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in runs.items()}
    mb, tf = med["minibt"], med["transformers"]
    rows = [
        ["import (s)", f"{mb['import']:.2f}", f"{tf['import']:.2f}", f"{mb['import'] / tf['import']:.2f}x", "<= 0.5x",
         "met" if mb["import"] / tf["import"] <= 0.5 else "missed"],
        ["load all-MiniLM-L6-v2 (s)", f"{mb['load']:.3f}", f"{tf['load']:.3f}", f"{mb['load'] / tf['load']:.2f}x",
         "<= 0.5x", "met" if mb["load"] / tf["load"] <= 0.5 else "missed"],
        ["peak RSS growth during the load (MB)", f"{mb['rss']:.0f}", f"{tf['rss']:.0f}",
         f"{mb['rss'] / size_mb:.2f}x checkpoint ({size_mb:.0f} MB)", "", ""],
        ["peak RSS growth, load + first forward (MB)", f"{mb['used']:.0f}", f"{tf['used']:.0f}",
         f"{mb['used'] / size_mb:.2f}x checkpoint", "<= 1.3x checkpoint",
         "met" if mb["used"] <= 1.3 * size_mb else "missed"],
    ]
    body = (f"Median of {args.repeat} fresh processes each, interleaved. `import`: `import minibt, minibt.loading` "
            "(a bare `import minibt` is lazy and imports no torch) vs "
            "`import transformers; transformers.BertModel`. `load`: `minibt.from_hub(folder)` vs "
            "`AutoModel.from_pretrained(folder)` after the import. RSS: growth of peak RSS over the "
            "post-import baseline, after the load and after one forward (B1 S16). minibt reads the tensor bytes into "
            "memory the model owns at load (no memory map: a checkpoint rewritten after loading cannot change the "
            "model), so the load reads the whole file.\n\n"
            + table(["measure", "minibt", "transformers", "ratio", "goal", ""], rows))
    write_section("load_and_import", body)


if __name__ == "__main__":
    main()
