"""torch.compile of each encoder layer's MLP (the largest matmuls), dynamic shapes so that new batch sizes and lengths
do not recompile; attention, with its data-dependent masks and sequence bounds, stays eager.

Measured on this CPU: no gain in fp32 or bf16 (README); kept because it is the supported way to compile minibt.
"""
from __future__ import annotations

from ..errors import BackendError


def applies(model) -> bool:
    return not getattr(model, "causal", False)


def apply(model) -> None:
    if not applies(model):
        raise BackendError(f"compile=True is implemented for encoders only, not {model.family}")
    for layer in model.layers:
        layer.mlp.compile(dynamic=True)
