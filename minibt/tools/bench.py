"""`minibt bench`: encoder time vs padding, every minibt backend (and, through `--with`, other libraries) on the
same weights and inputs.

Batch x length x padding fraction, interleaved runs (each repetition runs every contender once, in turn), median
times, speedup against minibt's sdpa; when `--with benchmarks.hf_contenders` adds transformers (minibt never imports
it), against transformers' sdpa measured in the same run. torch is imported inside the functions, so the CLI can
read SHAPES for its help without it.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

from ..errors import MinibtError
from .progress import Progress

SHAPES = {   # random-weight model shapes (no download)
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def padded_batch(batch: int, length: int, padding: float, vocab: int, seed: int = 0):
    """Right-padded batch whose padding fraction is `padding`: row 0 is full (so the width is `length`),
    the other rows share the remaining real tokens evenly."""
    import torch
    total = round((1 - padding) * batch * length)
    rest = max(total - length, 0)
    lengths = [length] + [rest // (batch - 1) + (i < rest % (batch - 1)) for i in range(batch - 1)] if batch > 1 else [length]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :max(n, 1)] = 1
    ids = torch.randint(1000, vocab - 1, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.masked_fill(mask == 0, 0), mask


def random_model(shape: str, dtype, compile: bool = False):
    """A bert-shaped minibt model with random weights (no checkpoint, no download)."""
    import torch
    from ..kernels import compile_mlp
    from ..models.bert import Bert, BertConfig
    c = SHAPES[shape]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                     num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                     add_pooling_layer=False)
    model = Bert(cfg).to(dtype).eval()
    if compile:
        compile_mlp.apply(model)
    return model


def torch_dtype(name: str | None):
    import torch
    return {None: torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_contenders(spec: str | None):
    """`--with module[:function]` or `--with path/to/file.py[:function]`: a function(shape_or_checkpoint, dtype) ->
    (folder or None, {name: fn(ids, mask)}) that adds other libraries' runs (benchmarks/hf_contenders.py adds
    transformers). minibt itself never imports them. When it returns a folder, minibt loads the same weights."""
    if not spec:
        return None
    module, _, function = spec.rpartition(":") if spec.count(":") and not spec.endswith(".py") else (spec, "", "")
    function = function or "contenders"
    try:
        # a dotted name that is a file under the current folder (`benchmarks.hf_contenders` from a checkout) is
        # read as that file, as `python -m` would find it; anything else is imported as installed
        local = Path(*module.split(".")).with_suffix(".py")
        if module.endswith(".py") or os.sep in module or local.is_file():
            path = Path(module) if module.endswith(".py") or os.sep in module else local
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except Exception as e:              # whatever the module raises while importing, say which and why
        hint = ("; outside a checkout pass the file itself, e.g. --with path/to/benchmarks/hf_contenders.py"
                if module.startswith("benchmarks.") else "")
        raise MinibtError(f"--with {spec}: cannot import {module}: {type(e).__name__}: {e}{hint}") from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise MinibtError(f"--with {spec}: {module} has no function {function!r}")
    return fn


def matmul_peak(dtype, n=1024, k=768, m=3072, reps=20) -> float:
    """GFLOP/s of one large GEMM (best of `reps`), the ceiling a dense encoder can reach on this machine.
    The first calls of a process run slow (thread pool, page faults), so three warm-ups."""
    import torch
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    for _ in range(3):
        a @ b
    t = min(_time(lambda: a @ b) for _ in range(reps))
    return 2 * n * k * m / t / 1e9


def useful_flops(cfg, mask) -> float:
    """FLOPs of the real tokens only: the linear layers plus attention over each sequence's own tokens."""
    h, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    lengths = mask.sum(1).double()
    linear = 2 * (4 * h * h + 2 * h * f) * lengths.sum()
    attn = 4 * h * (lengths ** 2).sum()
    return float(layers * (linear + attn))


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def contenders(model, backends, compile_model=None):
    """{name: fn(ids, mask)}: one minibt model, backends switched in place (same weights)."""
    out = {f"minibt {name}": (lambda ids, mask, name=name: model.set_attention(name)(ids, attention_mask=mask))
           for name in backends}
    if compile_model is not None:
        for name in backends:
            if name != "fused":
                out[f"minibt {name} +compile"] = (lambda ids, mask, name=name:
                                                  compile_model.set_attention(name)(ids, attention_mask=mask))
    return out


def run(model="bert-base", batches=(8,), lengths=(128,), paddings=(0.0, 0.5, 0.75), dtype=None,
        backends=("sdpa", "varlen", "fused", "auto"), reps=5, compile=False, progress=True, others=None,
        quantize=None):
    """Returns (rows, peak GFLOP/s); each row: batch, length, padding, contender, ms, and the speedup over the
    baseline ("transformers sdpa" when `others` adds it, else "minibt sdpa")."""
    import torch
    from .. import from_hub
    dtype = dtype or torch.float32
    if others:
        folder, extra = others(model, dtype)
    else:
        folder, extra = None, {}
    if folder is None and model not in SHAPES:
        folder = model
    if folder is not None:
        ours = from_hub(folder, dtype=dtype, head="base", quantize=quantize)
        twin = from_hub(folder, dtype=dtype, head="base", compile=True) if compile else None
    else:
        ours = random_model(model, dtype)
        if quantize:
            from ..kernels.quantize import quantize as quantize_model
            quantize_model(ours, quantize)
        twin = random_model(model, dtype, compile=True) if compile else None
    models = {**contenders(ours, list(backends), twin), **extra}
    cfg = ours.config
    peak = matmul_peak(dtype)
    grid = list(itertools.product(batches, lengths, paddings))
    rows = []
    bar = Progress(len(grid), "points", enabled=progress, every=0)
    for b, s, p in grid:
        ids, mask = padded_batch(b, s, p, cfg.vocab_size)
        times = {name: [] for name in models}
        with torch.inference_mode():
            for name, fn in models.items():       # warm-up (and a first compile) outside the timings
                fn(ids, mask)
            for _ in range(reps):
                for name, fn in models.items():
                    times[name].append(_time(lambda: fn(ids, mask)))
        med = {name: statistics.median(t) for name, t in times.items()}
        base = med.get("transformers sdpa", med.get("minibt sdpa"))
        flops = useful_flops(cfg, mask)
        for name, t in med.items():
            rows.append(dict(batch=b, length=s, padding=p, contender=name, ms=t * 1e3,
                             speedup=base / t if base else float("nan"), gflops=flops / t / 1e9))
        bar.update(1, f"B{b} S{s} pad {p:.2f}")
    bar.close()
    return rows, peak


def markdown(rows, peak, dtype) -> str:
    baseline = "transformers sdpa" if any(r["contender"] == "transformers sdpa" for r in rows) else "minibt sdpa"
    lines = [f"fp matmul peak measured in this run ({str(dtype).removeprefix('torch.')}): {peak:.0f} GFLOP/s; "
             "useful GFLOP/s counts real tokens only.", "",
             f"| batch | length | padding | contender | ms | speedup vs {baseline} | useful GFLOP/s | % of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['length']} | {r['padding']:.2f} | {r['contender']} | {r['ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['gflops']:.0f} | {100 * r['gflops'] / peak:.0f}% |")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'minibt[plot]'): no plot written", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (b, s), group in itertools.groupby(sorted(rows, key=lambda r: (r["batch"], r["length"], r["contender"])),
                                           key=lambda r: (r["batch"], r["length"])):
        group = list(group)
        for name in sorted({r["contender"] for r in group}):
            pts = sorted((r["padding"], r["speedup"]) for r in group if r["contender"] == name)
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=f"{name} B{b} S{s}")
    xs = [i / 100 for i in range(0, 80)]
    ax.plot(xs, [1 / (1 - x) for x in xs], "k:", label="ideal 1/(1-padding)")
    ax.set_xlabel("padding fraction")
    ax.set_ylabel("speedup vs the baseline (transformers sdpa when compared)")
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
