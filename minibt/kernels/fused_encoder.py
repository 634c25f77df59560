"""The "BetterTransformer" fastpath: each post-LN encoder layer in one call of torch's fused kernel.

`torch._transformer_encoder_layer_fwd` runs QKV projection, attention, output projection, residuals, both
LayerNorms and the FFN of a layer in one op, and skips padding when handed a nested tensor. We build that nested
tensor once for the whole stack from the packed tokens (so left-padded or holey masks are fine too).
"""
from __future__ import annotations

import warnings

import torch

from ..errors import BackendError

# The kernel knows two activations: exact GELU (use_gelu=True) or ReLU. Anything else would silently change numbers.
_KERNEL_ACTS = {"gelu": True, "relu": False}
# The strided nested layout is the one this kernel takes; torch warns that layout is a prototype.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")


class FusedEncoder:
    def __init__(self, model):
        cfg = model.config
        if getattr(model, "causal", False) or not hasattr(model, "layers") or not hasattr(cfg, "intermediate_size"):
            raise BackendError(f"attn='fused' is for encoders (BERT, RoBERTa, DistilBERT), not {model.family}")
        if cfg.hidden_act not in _KERNEL_ACTS:
            raise BackendError(f"attn='fused': torch's fused encoder kernel computes exact GELU or ReLU only, and this "
                               f"checkpoint uses hidden_act={cfg.hidden_act!r}; use attn='varlen' or 'sdpa' instead")
        self.model = model
        self.use_gelu = _KERNEL_ACTS[cfg.hidden_act]
        self.heads = cfg.num_heads

    def __call__(self, x, mask):
        """x: (1, T, H) packed tokens, mask.cu_seqlens their bounds -> (1, T, H)"""
        if self.model.training:
            raise BackendError("attn='fused' is inference only: call model.eval() (or use attn='varlen' to train)")
        if torch.is_autocast_enabled(x.device.type):
            raise BackendError("attn='fused' does not run under autocast: load the model in the dtype you want "
                               "(dtype=torch.bfloat16) instead")
        bounds = mask.bounds()
        if not bounds:
            return x
        with torch.no_grad():
            h = torch.nested.as_nested_tensor([x[0, s:e] for s, e in bounds])       # nested (B', S_b, H)
            for layer in self.model.layers:
                h = torch._transformer_encoder_layer_fwd(
                    h, x.shape[-1], self.heads, layer.qkv.weight, layer.qkv.bias, layer.out.weight, layer.out.bias,
                    self.use_gelu, False, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias,
                    layer.norm2.weight, layer.norm2.bias, layer.up.weight, layer.up.bias,
                    layer.down.weight, layer.down.bias, None, None)
            return torch.cat(h.unbind(), 0).unsqueeze(0)
