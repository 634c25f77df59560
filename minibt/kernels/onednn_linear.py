"""fp32 encoder linears through oneDNN with weights prepacked once, where MKL's fp32 GEMM was measured slower.

On an AMD EPYC (Zen 4, AVX-512, 2 threads, torch 2.13) F.linear's fp32 GEMM (MKL) was the loss against ONNX
Runtime's fp32 (issue 26): 81% of minibt's fp32 embedding time was its GEMMs. oneDNN's linear on a weight reordered
once into its blocked layout took, at all-MiniLM-L6-v2's shapes and 4,096 tokens:

| in -> out    | F.linear (MKL) | oneDNN, prepacked |
|--------------|----------------|-------------------|
| 384 -> 1152  | 26.2 ms        | 18.7 ms           |
| 384 -> 1536  | 31.8 ms        | 24.3 ms           |
| 1536 -> 384  | 39.5 ms        | 23.6 ms           |

The maths is F.linear's (the sums in another order: equal within fp32 rounding, tests/test_kernels.py). Applied to
encoders in fp32 on CPUs that are not Intel's (MKL was measured at 92% of its peak on the Intel AMX machine, so it
stays there). The packed copy is made on the first fp32 inference call (no autograd through it: with gradients on,
F.linear runs, and under torch.compile) and kept beside the weight: the linear layers' weights take twice the memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decode_linear import over, swap_linears


def _vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


NOT_INTEL = _vendor() not in ("", "GenuineIntel")


class PackedLinear(nn.Linear):
    """nn.Linear whose fp32 CPU inference runs oneDNN's linear on a prepacked copy of the weight."""

    def forward(self, x):
        w = self.weight
        if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                or torch.compiler.is_compiling()):          # inductor picks its own GEMM (and lowers F.linear)
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version)
        if getattr(self, "_packed", (None, None))[0] != key:          # a new or changed weight: pack again
            self._packed = key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self._packed[1], self.bias,
                                               "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def applies(model) -> bool:
    return NOT_INTEL and not getattr(model, "causal", False)


def apply(model) -> None:
    """Swap every plain nn.Linear of the encoder layers for a PackedLinear over the same parameters."""
    swap_linears(model.layers, lambda linear: over(PackedLinear, linear))
