"""The "BetterTransformer" fastpath as a model-level transform: an encoder's layer stack swapped for one that runs
each post-LN layer as one call of torch's fused kernel (`attn="fused"`).

`torch._transformer_encoder_layer_fwd` runs QKV projection, attention, output projection, residuals, both
LayerNorms and the FFN of a layer in one op, and skips padding when handed a nested tensor. The stack builds that
nested tensor once from the packed tokens (the `fused` backend is `packed`, so the model's Batch removes the padding
at its entry; left-padded or holey masks are fine too). Registered as the attention backend `fused` by
minibt/kernels/__init__.py.

Accepts: encoders (BERT, RoBERTa, DistilBERT) whose activation is exact GELU or ReLU (the two the kernel computes;
a `gelu_new` model is refused rather than given other numbers), in eval mode, not under autocast.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import BackendError
from ..models.bert import LayerStack

# The kernel knows two activations: exact GELU (use_gelu=True) or ReLU. Anything else would silently change numbers.
_KERNEL_ACTS = {"gelu": True, "relu": False}


class FusedEncoder(torch.nn.ModuleList):
    """The same layers (same parameters, same names), run by the fused kernel."""

    def __init__(self, layers, cfg):
        super().__init__(list(layers))
        self.use_gelu, self.num_heads = _KERNEL_ACTS[cfg.hidden_act], cfg.num_heads

    def forward(self, x, batch):
        """x: (1, T, H) packed tokens, batch.mask.cu_seqlens their bounds -> ((1, T, H), no probabilities)."""
        if self.training:
            raise BackendError("attn='fused' is inference only: call model.eval() (or use attn='varlen' to train)")
        if torch.is_autocast_enabled(x.device.type):
            raise BackendError("attn='fused' does not run under autocast: load the model in the dtype you want "
                               "(dtype=torch.bfloat16) instead")
        bounds, none = batch.mask.bounds(), [None] * len(self)
        if not bounds:
            return x, none
        with torch.no_grad(), warnings.catch_warnings():
            # the strided nested layout is the one this kernel takes; torch warns that it is a prototype
            warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
            h = torch.nested.as_nested_tensor([x[0, s:e] for s, e in bounds])       # nested (B', S_b, H)
            for layer in self:
                a, m = layer.attention, layer.mlp
                h = torch._transformer_encoder_layer_fwd(
                    h, x.shape[-1], self.num_heads, a.qkv.weight, a.qkv.bias, a.out.weight, a.out.bias,
                    self.use_gelu, False, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias,
                    layer.norm2.weight, layer.norm2.bias, m.up.weight, m.up.bias, m.down.weight, m.down.bias,
                    None, None)
            return torch.cat(h.unbind(), 0).unsqueeze(0), none


def apply(model) -> None:
    """Swap the layer stack; raises a BackendError naming why when this model cannot run fused exactly."""
    if isinstance(model.layers, FusedEncoder):
        return
    if model.variants:
        raise BackendError(f"attn='fused': torch's fused encoder kernel computes plain attention, and {model.family} "
                           f"needs {', '.join(sorted(model.variants))}; use attn='varlen' or 'sdpa' instead")
    if getattr(model, "causal", False):
        raise BackendError(f"attn='fused' is torch's fused encoder layer, for encoders; {model.family} is a decoder: "
                           "use 'varlen', 'sdpa' or 'auto'")
    if not isinstance(model.layers, LayerStack):
        raise BackendError(f"attn='fused' runs BERT's post-LN layer (BERT, RoBERTa, XLM-R, DistilBERT); "
                           f"{model.family}'s layers are another network: use 'varlen', 'sdpa' or 'auto'")
    act = model.config.hidden_act
    if act not in _KERNEL_ACTS:
        raise BackendError(f"attn='fused': torch's fused encoder kernel computes exact GELU or ReLU only, and this "
                           f"checkpoint uses hidden_act={act!r}; use attn='varlen' or 'sdpa' instead")
    # (quantized linears expose a dequantized .weight: the fused kernel then reads float weights made per call)
    model.layers = FusedEncoder(model.layers, model.config).train(model.layers.training)


def remove(model) -> None:
    """Back to the plain stack (same layer modules); nothing to do when not fused."""
    if isinstance(getattr(model, "layers", None), FusedEncoder):
        model.layers = LayerStack(list(model.layers)).train(model.layers.training)
