"""minibt: BERT, RoBERTa, DistilBERT, OPT and Llama in plain PyTorch, every attention call through one interface."""
from __future__ import annotations

from . import errors
from .errors import MinibtError
from .hub import bundled_model

__all__ = ["from_hub", "load_tokenizer", "embed", "Encoder", "Reranker", "audit", "bundled_model", "attention", "errors",
           "MinibtError", "__version__"]

# Public names imported on first use (PEP 562), so `import minibt` (and `minibt --help`) does not import torch.
_LAZY = {"attention": (".attention", None), "embed": (".embedding", "embed"), "Encoder": (".encoder", "Encoder"),
         "Reranker": (".reranker", "Reranker"),
         "load_tokenizer": (".tokenizer", "load_tokenizer"), "audit": (".tools.audit", "audit")}


def from_hub(name_or_path, attn: str = "auto", dtype=None, device="cpu", revision=None, head: str = "auto",
             compile: bool = False, optimize: bool = True, quantize: str | None = None):
    """Load a hub repo id or a local folder (config.json + safetensors, single or sharded) as a minibt model.

    attn: any name in minibt.attention.backends(); dtype: None (the checkpoint's) or a torch dtype / name;
    head: "auto" (from config.json "architectures"), "base", "masked-lm", "sequence-classification", "causal-lm";
    optimize: apply minibt.kernels' default CPU transforms (False: the plain reference model);
    compile: torch.compile each encoder layer's MLP (kernels/compile.py);
    quantize: "int8" | "int4": integer weights for the linear layers, right after loading (kernels/quantize.py);
    "w8a8": int8 weights and int8 activations (CPU); "auto": for an encoder on the CPU, the fastest path measured for
    this kind of CPU that keeps embeddings within min cosine 0.99 of fp32 (kernels.quantize.auto_path; README); a
    folder written by minibt.kernels.quantize.save_quantized loads as the quantized model it holds."""
    from .loading import load
    return load(name_or_path, attn=attn, dtype=dtype, device=device, revision=revision, head=head, compile=compile,
                optimize=optimize, quantize=quantize)


def __getattr__(name):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("minibt")
        except PackageNotFoundError:          # a plain checkout on sys.path: read pyproject.toml
            import re
            from pathlib import Path
            text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
            return re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    if name not in _LAZY:
        raise AttributeError(f"module 'minibt' has no attribute {name!r}")
    import importlib
    if name == "attention":
        importlib.import_module(".kernels", __name__)      # registers the model-level backend `fused`
    module, attr = _LAZY[name]
    value = importlib.import_module(module, __name__)
    return value if attr is None else getattr(value, attr)
