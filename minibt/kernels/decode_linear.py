"""CPU decode linears: faster paths for the few-token products of decoding (OPT, Llama), as a module swap.

Two measured tricks (SmolLM2-135M, torch 2.13, 2 CPU threads; docs/benchmarks.md "generate"):
- bf16, 1 token: torch.mv on a CPU with AMX; 2-16 tokens, and 1 token elsewhere: W @ x^T with the output copied
  back to row-major. On the AMX machine all linear layers of one step took 16 ms that way vs 23-26 ms through
  F.linear (its small-M bf16 path is slow). On an AMD Zen 4 (AVX-512 bf16, no AMX) torch.mv is the slow one: a
  (151936, 1024) LM head took 38.3 ms with mv, 25.5 with F.linear and 20.5 with W @ x^T; a (6144, 1024) projection
  1.43 / 0.57 / 0.48 ms. Row-major output matters: a column-major q sent SDPA to its math path (a bf16 batch-4 step
  took 32 ms instead of 25 ms).
- fp32: weights stored transposed in memory (same shape, other strides). A decode step multiplies one token by
  every weight, and MKL's fp32 GEMV streams an (in, out) row-major matrix faster than an (out, in) one: the linear
  layers of one step took 18.8 ms instead of 24.3 ms in isolation, a whole decode step 28.3 instead of 31.5 ms.
Larger products (prefill) take F.linear either way.

Inside a compiled step (kernels/static_decode.py) a one-row product takes `one_row` instead: y = sum_k x[k] * W[:, k]
written as an elementwise product and a sum, which inductor turns into one vectorized loop streaming W's rows
(fp32 accumulation, the weight's dtype converted in registers). Measured on SmolLM2-135M's 121 linears, one row,
AMD Zen 4, 2 threads, compiled with static_decode's options (the input row stored once, not converted per weight
row): fp32 21.7 ms vs 47.3 (F.linear, row-major) and 38.5 (column-major above); bf16 9.9 vs 27.1 ms; int8 weights
(kernels/quantize.py) 6.6 vs 15.6 ms (torch._weight_int8pack_mm). It wants row-major weights: `row_major(model)`
undoes the fp32 column-major layout (generate(compile=...) calls it for a batch of one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


MV_FOR_ONE_TOKEN = torch.cpu._is_amx_tile_supported()      # where torch.mv was measured the faster (see above)


def over(cls, linear: nn.Linear, weight: "nn.Parameter | None" = None) -> nn.Linear:
    """An nn.Linear subclass `cls` over `weight` (default: linear's own) and linear's bias (built on meta: nothing
    allocated); the kernels' module swaps (here and onednn_linear.py)."""
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight, new.bias = linear.weight if weight is None else weight, linear.bias
    return new.train(linear.training)


def swap_linears(root: nn.Module, make) -> None:
    """Every plain nn.Linear under `root` replaced by make(linear)."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))


def relaid(done: dict, p: nn.Parameter, make) -> nn.Parameter:
    """p with its data made by make(data), once per tensor (`done` keyed by id: tied weights stay one tensor)."""
    if id(p) not in done:
        done[id(p)] = nn.Parameter(make(p.detach()), requires_grad=p.requires_grad)
    return done[id(p)]


class DecodeLinear(nn.Linear):
    """nn.Linear with the bf16 few-token paths above; identical maths."""

    def forward(self, x):
        w, k = self.weight, self.in_features
        if x.numel() == k and w.is_contiguous() and x.is_cpu and torch.compiler.is_compiling():
            return one_row(x, w, self.bias)
        if w.dtype != torch.bfloat16 or not 0 < x.numel() <= 16 * k:
            return F.linear(x, w, self.bias)
        if x.numel() == k and MV_FOR_ONE_TOKEN:
            y = torch.mv(w, x.reshape(k))
        else:
            y = torch.mm(w, x.reshape(-1, k).t()).t().contiguous()
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], self.out_features)


def one_row(x, w, bias=None, scale=None):
    """x (..., in) holding one row times w (out, in), row-major, of any dtype: (x * w).sum(-1) in fp32, times
    `scale` (out,) if given (an int8 weight's scales), plus `bias`; returned in x's dtype. For compiled code only:
    eagerly it would materialise the (out, in) product."""
    y = (x.reshape(1, -1).float() * w.float()).sum(-1)
    if scale is not None:
        y = y * scale.float()
    y = y.to(x.dtype)
    return (y if bias is None else y + bias).view(*x.shape[:-1], w.shape[0])


def row_major(model) -> None:
    """Undo `apply`'s column-major fp32 layout (tied weights stay one tensor), for `one_row`; one matrix at a time."""
    done = {}
    for module in list(model.modules()):
        if (isinstance(module, DecodeLinear) or module is getattr(model, "embed", None)) \
                and not module.weight.is_contiguous():
            module.weight = relaid(done, module.weight, torch.Tensor.contiguous)


def applies(model) -> bool:
    return getattr(model, "causal", False)


def apply(model) -> None:
    """Swap every plain nn.Linear of a decoder for a DecodeLinear over the same parameters, and keep fp32 weights
    column-major (the embedding too: a tied LM head reads it; tied weights stay one tensor)."""
    done = {}

    def layout(p: nn.Parameter) -> nn.Parameter:
        if p.dtype != torch.float32 or p.dim() != 2 or not p.is_contiguous():
            return p
        return relaid(done, p, lambda t: t.t().contiguous().t())

    swap_linears(model, lambda linear: over(DecodeLinear, linear, layout(linear.weight)))
    if hasattr(model, "embed"):
        model.embed.weight = layout(model.embed.weight)
