"""minibt: BERT, RoBERTa, DistilBERT, OPT and Llama in plain PyTorch, every attention call through one interface."""
from __future__ import annotations

from . import attention, errors
from .embed import embed
from .errors import MinibtError
from .hub import bundled_model
from .tokenizer import load_tokenizer

__all__ = ["from_hub", "load_tokenizer", "embed", "audit", "bundled_model", "attention", "errors", "MinibtError"]


def from_hub(name_or_path, attn: str = "auto", dtype=None, device="cpu", revision=None, head: str = "auto",
             compile: bool = False, optimize: bool = True):
    """Load a hub repo id or a local folder (config.json + safetensors, single or sharded) as a minibt model.

    attn: any name in minibt.attention.backends(); dtype: None (the checkpoint's) or a torch dtype / name;
    head: "auto" (from config.json "architectures"), "base", "masked-lm", "sequence-classification", "causal-lm";
    optimize: apply minibt.kernels' default CPU transforms (False: the plain reference model);
    compile: torch.compile each encoder layer's MLP (kernels/compile.py)."""
    from .loading import load
    return load(name_or_path, attn=attn, dtype=dtype, device=device, revision=revision, head=head, compile=compile,
                optimize=optimize)


def __getattr__(name):
    if name == "audit":                      # tooling: imported on first use, never by the core itself
        from .tools.audit import audit
        return audit
    raise AttributeError(f"module 'minibt' has no attribute {name!r}")
