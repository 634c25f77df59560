"""minibt: BERT, RoBERTa, DistilBERT, OPT and Llama in plain PyTorch, every attention call through one interface."""
from __future__ import annotations


from . import attention, errors
from .embed import embed
from .errors import ConfigError, MinibtError
from .hub import bundled_model, resolve
from .loading import Checkpoint, empty_model, load_weights, map_keys, pick_dtype, read_config, weights_map
from .tokenizer import load_tokenizer

__all__ = ["from_hub", "load_tokenizer", "embed", "audit", "bundled_model", "attention", "errors", "MinibtError"]


def __getattr__(name):
    if name == "audit":                      # tooling: imported on first use, never by the core itself
        from .tools.audit import audit
        return audit
    raise AttributeError(f"module 'minibt' has no attribute {name!r}")

HEAD_SUFFIXES = {"ForMaskedLM": "masked-lm", "ForPreTraining": "masked-lm", "ForCausalLM": "causal-lm",
                 "ForSequenceClassification": "sequence-classification"}


def from_hub(name_or_path, attn: str = "auto", dtype=None, device="cpu", revision=None, head: str = "auto",
             compile: bool = False, quantize: str | None = None):
    """Load a hub repo id or a local folder (config.json + safetensors, single or sharded).
    compile=True: torch.compile the dense half-layers of an encoder (model.compile_layers()).
    quantize="int8" | "int4": quantize the linear layers right after loading (minibt.kernels.quantize); a folder
    written by minibt.kernels.quantize.save_quantized loads as the quantized model it holds."""
    from .models import MODEL_TYPES
    from .kernels import quantize as q
    folder = resolve(name_or_path, revision)
    if (folder / q.QUANTIZED_FILE).is_file():
        return q.load_quantized(folder, attn=attn, device=device, expect=quantize)
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
    if quantize is not None:
        q.quantize(model, quantize)
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
