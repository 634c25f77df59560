"""minibt: BERT, RoBERTa, DistilBERT, OPT and Llama in plain PyTorch, every attention call through one interface."""
from __future__ import annotations

import sys
import types

from . import errors
from .errors import ConfigError, MinibtError
from .hub import bundled_model, resolve

__all__ = ["from_hub", "load_tokenizer", "embed", "Encoder", "audit", "bundled_model", "attention", "errors",
           "MinibtError", "__version__"]

# Public names imported on first use (PEP 562), so `import minibt` (and `minibt --help`) does not import torch.
_LAZY = {"attention": (".attention", None), "embed": (".embed", "embed"), "Encoder": (".encoder", "Encoder"),
         "load_tokenizer": (".tokenizer", "load_tokenizer"), "audit": (".tools.audit", "audit"),
         "Checkpoint": (".loading", "Checkpoint"), "empty_model": (".loading", "empty_model"),
         "load_weights": (".loading", "load_weights"), "map_keys": (".loading", "map_keys"),
         "pick_dtype": (".loading", "pick_dtype"), "read_config": (".loading", "read_config"),
         "weights_map": (".loading", "weights_map")}


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
    module, attr = _LAZY[name]
    value = importlib.import_module(module, __name__)
    return value if attr is None else getattr(value, attr)


class _Module(types.ModuleType):
    """`minibt.embed` is the function, while `minibt/embed.py` is also a submodule: the import system binds a
    submodule onto its package when first imported, which would hide the function; keep the function."""

    def __setattr__(self, name, value):
        if name == "embed" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Module

HEAD_SUFFIXES = {"ForMaskedLM": "masked-lm", "ForPreTraining": "masked-lm", "ForCausalLM": "causal-lm",
                 "ForSequenceClassification": "sequence-classification"}


def from_hub(name_or_path, attn: str = "auto", dtype=None, device="cpu", revision=None, head: str = "auto",
             compile: bool = False):
    """Load a hub repo id or a local folder (config.json + safetensors, single or sharded).
    compile=True: torch.compile the dense half-layers of an encoder (model.compile_layers())."""
    from .loading import Checkpoint, empty_model, load_weights, map_keys, pick_dtype, read_config, weights_map
    from .models import MODEL_TYPES
    folder = resolve(name_or_path, revision)
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{folder / 'config.json'}: model_type={model_type!r} is not supported; minibt has "
                          f"{', '.join(MODEL_TYPES)}")
    cls = MODEL_TYPES[model_type]
    head = _pick_head(config, head, cls.heads)
    checkpoint = Checkpoint(folder)
    spec = weights_map(cls.family)
    present, _ = map_keys(checkpoint.where, spec)
    dtype = pick_dtype(dtype, config, device)
    with empty_model():
        model = cls.from_hf(config, head, set(present))
    load_weights(model, checkpoint, spec, dtype, device)
    model.source = folder
    model.generation = generation_defaults(folder, config)
    model.eval().set_attention(attn)
    if compile:
        if not hasattr(model, "compile_layers"):
            raise errors.BackendError(f"compile=True is implemented for encoders only, not {model.family} yet")
        model.compile_layers()
    return model


def generation_defaults(folder, config: dict) -> dict:
    """eos/pad token ids for generate(): config.json, overridden by generation_config.json when present."""
    import json
    out = {k: config.get(k) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    path = folder / "generation_config.json"
    if path.is_file():
        out.update({k: v for k, v in json.loads(path.read_text()).items() if k in out and v is not None})
    return out


def _pick_head(config: dict, head: str, available) -> str:
    if head == "auto":
        arch = (config.get("architectures") or [""])[0]
        head = next((h for suffix, h in HEAD_SUFFIXES.items() if arch.endswith(suffix)), "base")
        return head if head in available else "base"
    if head not in available:
        raise ConfigError(f"head={head!r} is not available for model_type={config.get('model_type')!r}; "
                          f"choose from {', '.join(available)}")
    return head
