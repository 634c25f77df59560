"""Speed as named transforms, applied after loading; the model files keep the textbook maths.

Each transform is tested equal to the plain form (tests/test_kernels.py) and listed here with what it buys, measured
on this project's CPU (2 threads, torch 2.13; figures from docs/benchmarks.md and each module's docstring).

| transform        | what it swaps                                  | applied by                   | measured gain |
|------------------|------------------------------------------------|------------------------------|---------------|
| `decode_linear`  | decoders' nn.Linear -> DecodeLinear (bf16 mv / W @ x^T for 1-16 tokens; `one_row` inside a compiled step); fp32 weights column-major (`row_major` for the compiled step) | `optimize` (from_hub default) | linears of a SmolLM2 step 16 vs 23-26 ms (bf16), 18.8 vs 24.3 ms (fp32) |
| `rmsnorm`        | Llama's RMSNorm -> one LayerNorm over [x, -x]  | `optimize` (from_hub default) | 1.4-1.6 ms of a 25-46 ms decode step |
| `onednn_linear`  | encoders' nn.Linear -> PackedLinear (oneDNN on a weight prepacked once; fp32 inference) on non-Intel CPUs | `optimize` (from_hub default) | AMD Zen 4, 4,096 tokens: 18.7-24.3 vs 26.2-39.5 ms a linear (MKL) |
| `fused_encoder`  | an encoder's layer stack -> torch's fused encoder-layer op on a nested tensor | `set_attention("fused")` (registered here) | slower than varlen here at every padding (README table); never picked by auto |
| `compile_mlp`    | each encoder layer's MLP -> torch.compile'd   | `from_hub(compile=True)`     | none measured (fp32, bf16) |
| `static_decode`  | generate's decode steps -> one fullgraph torch.compile'd static-shape step (fixed-size caches, masked full-length attention, a RoPE table) | `generate(compile=True)`, `minibt generate --compile` | SmolLM2-135M batch 1, fp32 / bf16 / int8 / int4: 61.3 / 77.8 / 98.7 / 89.5 vs 22.0 / 30.0 / 48.8 / 71.5 tok/s eager (AMD Zen 4; docs/benchmarks.md generate_quantized) |
| `malloc`         | glibc keeps freed activation memory (process-wide, so only when asked) | `embed(..., keep_memory=True)`, `minibt embed --file`, `minibt serve` | bf16 embedding +5-10% |

`optimize(model)` applies the default ones that apply to this model; `from_hub(..., optimize=False)` gives the plain
reference model (the numbers differ only by rounding: each transform's test states by how much).
"""
from __future__ import annotations

from .. import attention, generate
from . import decode_linear, fused_encoder, onednn_linear, rmsnorm, static_decode

attention.register_transform("fused", fused_encoder, packed=True)
generate.STATIC_DECODE[:] = [static_decode]                # generate(compile=True)
DEFAULT = {"decode_linear": decode_linear, "rmsnorm": rmsnorm, "onednn_linear": onednn_linear}


def optimize(model):
    """Apply every default transform that applies to `model`; returns the model."""
    for transform in DEFAULT.values():
        if transform.applies(model):
            transform.apply(model)
    return model
