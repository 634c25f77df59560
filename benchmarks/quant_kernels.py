"""How fast each one-token (decode) matmul kernel streams its weights from memory, on SmolLM2-135M's layer shapes.

A batch-1 decode step multiplies one token by every weight once, so its floor is the weight bytes over the memory
bandwidth. Here the 120 linear weights of SmolLM2's 30 layers are multiplied in turn, as in a decode step, so that
each comes from memory (together they exceed the core-private caches; the machine's shared L3 may still hold some),
and the same kernels are also timed on one weight reused (cache-hot). Rates are weight bytes read per second.

Kernels: fp32 `x @ W^T` over column-major weights (what kernels/decode_linear.py uses), bf16 `torch.mv`,
`torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` (what kernels/quantize.py uses, bf16 activations),
fbgemm's `quantized.linear_dynamic` (int8 weights, activations quantized per call), oneDNN's
`onednn.qlinear_pointwise` (what inductor's x86 int8 path calls; weights prepacked, the uint8 activation already
quantized, so the row is the kernel alone) and `torch._int_mm` (int8 x int8, the activation already quantized).

A second table splits real SmolLM2-135M decode steps (batch 1, from_hub(..., quantize=), fp32 model) into the time
inside the quantized linear modules, the part of it inside the integer kernel itself, and everything else (norms,
RoPE, attention over the KV cache, residuals, argmax), timed with perf_counter around each call; llama.cpp's whole
decode step on the same model (llama-cpp-python, as in generate.py) is timed in the same run for scale.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from _report import table, test_module, write_section

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]     # (in, out): qkv, out, gate_up, down


def layers():
    """Every kernel's operands for 30 layers of SmolLM2 shapes; random weights (speed does not depend on values)."""
    from minibt.kernels.quantize import Int4Linear, Int8Linear
    g = torch.Generator().manual_seed(0)
    out = []
    for k, n in SHAPES * 30:
        w = torch.randn(n, k, generator=g) * 0.05
        q8, q4 = Int8Linear.from_weight(w), Int4Linear.from_weight(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                           # quantized tensors are deprecated
            qw = torch.quantize_per_channel(w, q8.scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        out.append(dict(k=k, n=n, fp32=w.t().contiguous().t(), bf16=w.bfloat16(), q8=q8, q4=q4,
                        fbgemm=torch.ops.quantized.linear_prepack(qw, None), i8=q8.qweight.t(),
                        onednn=torch.ops.onednn.qlinear_prepack(q8.qweight, [1, k]), zp=torch.zeros(n, dtype=torch.long)))
    return out


KERNELS = {   # name -> (bytes per weight, call(layer, x fp32 (1, k), x bf16 (1, k), x int8 (1, k)))
    "fp32 x @ W^T, column-major W": (4, lambda L, x, xb, xi: F.linear(x, L["fp32"])),
    "bf16 torch.mv": (2, lambda L, x, xb, xi: torch.mv(L["bf16"], xb[0])),
    "int8 torch._weight_int8pack_mm": (1, lambda L, x, xb, xi: torch._weight_int8pack_mm(xb, L["q8"].qweight,
                                                                                           L["q8"].scale_bf16)),
    "int4 torch._weight_int4pack_mm_for_cpu": (0.5, lambda L, x, xb, xi: torch._weight_int4pack_mm_for_cpu(
        xb, L["q4"].packed, L["q4"].group_size, L["q4"].scale_zero)),
    "int8 fbgemm quantized.linear_dynamic": (1, lambda L, x, xb, xi: torch.ops.quantized.linear_dynamic(
        x, L["fbgemm"], True)),
    "int8 oneDNN qlinear_pointwise (uint8 activation)": (1, lambda L, x, xb, xi: torch.ops.onednn.qlinear_pointwise(
        xi.view(torch.uint8), 0.01, 128, L["onednn"], L["q8"].scale, L["zp"], None, 1.0, 0, torch.float32, "none", [],
        "")),
    "int8 x int8 torch._int_mm": (1, lambda L, x, xb, xi: torch._int_mm(xi, L["i8"])),
}


def rate(fn, ls, inputs, reps: int) -> float:
    """Best of reps: weight bytes over seconds for one pass over ls."""
    def one_pass():
        for L in ls:
            fn(L, *inputs[L["k"]])
    one_pass()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - t)
    return best


def step_split(scheme: str, steps: int = 40, skip: int = 5) -> list[str]:
    """[scheme, ms per step, ms in the quantized linears, ms in their kernels, ms in the rest, linears per step]."""
    import minibt
    from minibt.kernels import quantize as Q
    from minibt.attention import KVCache
    model = minibt.from_hub(test_module("smollm2_fixture").build_smollm2(), quantize=scheme)
    spent = {"linear": 0.0, "kernel": 0.0, "calls": 0}
    saved = {cls: (cls.forward, cls.mm) for cls in (Q.Int8Linear, Q.Int4Linear)}

    def timed(key, fn):
        def wrapper(*args):
            t = time.perf_counter()
            out = fn(*args)
            spent[key] += time.perf_counter() - t
            spent["calls"] += key == "linear"
            return out
        return wrapper
    for cls, (forward, mm) in saved.items():
        cls.forward, cls.mm = timed("linear", forward), timed("kernel", mm)
    try:
        with torch.inference_mode():
            ids = torch.randint(100, 40000, (1, 64), generator=torch.Generator().manual_seed(0))
            cache = KVCache.for_model(model, 1, 64 + steps)
            nxt = model(ids, past_key_values=cache, last_only=True).logits[:, -1].argmax(-1)
            mask, total = torch.ones(1, 65, dtype=torch.long), 0.0
            for i in range(steps):
                if i == skip:                                            # warm-up steps not counted
                    spent.update(linear=0.0, kernel=0.0, calls=0)
                    total = 0.0
                t = time.perf_counter()
                nxt = model(nxt[:, None], attention_mask=mask, past_key_values=cache, last_only=True).logits[:, -1].argmax(-1)
                total += time.perf_counter() - t
                mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
    finally:
        for cls, (forward, mm) in saved.items():
            cls.forward, cls.mm = forward, mm
    n = steps - skip
    return [f"minibt {scheme}", f"{total / n * 1e3:.1f}", f"{spent['linear'] / n * 1e3:.1f}", f"{spent['kernel'] / n * 1e3:.1f}",
            f"{(total - spent['linear']) / n * 1e3:.1f}", f"{spent['calls'] / n:.0f}"]


def llama_cpp_step(width: str, steps: int = 32, reps: int = 3) -> list[str] | None:
    """llama.cpp's decode step on the SmolLM2 GGUF at `width` (Q8_0 / Q4_1), ms: (prompt + steps - prompt) / steps."""
    import generate
    if width not in generate.gguf_files():
        return None
    _, decode = generate.load_variant(f"llama.cpp {width}")
    ids, _ = generate.prompts(1, 64)
    decode(ids, 1)
    one = min(_time(lambda: decode(ids, 1)) for _ in range(reps))
    many = min(_time(lambda: decode(ids, 1 + steps)) for _ in range(reps))
    return [f"llama.cpp {width} (whole step)", f"{(many - one) / steps * 1e3:.1f}", "", "", "", ""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    ls = layers()
    g = torch.Generator().manual_seed(1)
    inputs = {k: (x := torch.randn(1, k, generator=g), x.bfloat16(), torch.randint(-127, 128, (1, k), generator=g,
                                                                                    dtype=torch.int8))
              for k in {k for k, _ in SHAPES}}
    weights = sum(L["k"] * L["n"] for L in ls)
    hot = [ls[2]] * len(ls)                                          # one gate_up weight, reused
    hot_weights = ls[2]["k"] * ls[2]["n"] * len(hot)
    rows = []
    with torch.inference_mode():
        for name, (size, fn) in KERNELS.items():
            cold, warm = rate(fn, ls, inputs, args.reps), rate(fn, hot, inputs, args.reps)
            rows.append([name, f"{weights * size / 2**20:.0f}", f"{cold * 1e3:.1f}",
                         f"{weights * size / cold / 1e9:.1f}", f"{hot_weights * size / warm / 1e9:.1f}"])
            print(rows[-1], flush=True)
    a = torch.empty(64 << 20)                                        # 256 MiB: plain read bandwidth, for scale
    a.fill_(1.0)
    read = a.numel() * 4 / min(_time(lambda: a.sum()) for _ in range(args.reps)) / 1e9
    split = [step_split(scheme) for scheme in ("int8", "int4")]
    split += [row for row in (llama_cpp_step("Q8_0"), llama_cpp_step("Q4_1")) if row]
    for row in split:
        print(row, flush=True)
    body = (__doc__.split("\n\n", 1)[1].strip() + "\n\n"
            + table(["kernel", "weights MiB", "ms for the 30 layers", "GB/s from memory", "GB/s cache-hot"], rows)
            + f"\n\nPlain read bandwidth in this run (sum of a 256 MiB fp32 tensor): {read:.1f} GB/s.\n\n"
            + "Where a SmolLM2-135M decode step's time goes (batch 1, fp32 model, mean of 35 steps after 5 warm-up):\n\n"
            + table(["variant", "ms per step", "ms in quantized linears", "ms of it in the kernel", "ms in the rest",
                     "linears per step"], split))
    write_section("quant_kernels", body)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
