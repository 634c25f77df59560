"""Sentence embeddings the sentence-transformers way (its pooling, Normalize and length settings, read from the
checkpoint), computed at deployment speed: tokenise once, sort by token count, batch by a token budget."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Fields, read_json
from .errors import ConfigError, InputError
from .hub import inside
from .kernels.malloc import keep_freed_memory
from .tokenizer import text_list


@dataclass
class Recipe:
    pooling: str = "mean"              # mean | cls | max
    normalize: bool = False
    max_seq_length: int | None = None
    lowercase: bool = False

    @classmethod
    def read(cls, folder: Path | None) -> "Recipe":
        """1_Pooling/config.json, modules.json (Normalize) and sentence_bert_config.json; defaults when absent."""
        recipe = cls()
        if folder is None:
            return recipe
        modules = read_json(inside(folder, "modules.json"), kind=list) or []
        if not all(isinstance(m, dict) for m in modules):
            raise ConfigError(f"{folder / 'modules.json'}: must be a list of objects")
        pool_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
        pool = read_json(inside(folder, f"{pool_dir}/config.json")) or {}
        modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens") if pool.get(f"pooling_mode_{m}")]
        if len(modes) > 1 or modes and modes[0] == "mean_sqrt_len_tokens":
            raise ConfigError(f"{folder / pool_dir / 'config.json'}: pooling {modes} is not supported (one of cls, mean, max)")
        if modes:
            recipe.pooling = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[modes[0]]
        recipe.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        st = Fields(read_json(inside(folder, "sentence_bert_config.json")) or {},
                    str(folder / "sentence_bert_config.json"))
        recipe.max_seq_length = st.int("max_seq_length", None, none_ok=True)
        recipe.lowercase = st.bool("do_lower_case", False)
        return recipe


def pool(hidden, mask, how: str):
    """hidden (B, S, H), mask (B, S) -> (B, H)"""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if how == "cls":
        return hidden[:, 0]
    if how == "max":                    # a text with no token at all pools to zeros, not -inf
        return hidden.masked_fill(m == 0, float("-inf")).amax(1).clamp(min=torch.finfo(hidden.dtype).min) \
            * (m.sum(1) > 0)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def token_batches(lengths, batch_tokens: int, batch_size: int | None = None):
    """Indices grouped so that rows x longest row <= batch_tokens (and rows <= batch_size), shortest texts first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch = []
    for i in order:                                    # ascending: the newcomer is the batch's longest row
        full = batch_size is not None and len(batch) == batch_size
        if batch and (full or (len(batch) + 1) * lengths[i] > batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def embed(model, tok, texts, batch_size: int | None = None, batch_tokens: int = 4096,
          keep_memory: bool = False) -> torch.Tensor:
    """(N, H) float32 vectors in the order of `texts` (a list of strings; a single string is one text: (1, H)).
    Texts longer than the checkpoint's max_seq_length are truncated to it (as sentence-transformers does); an empty
    text is embedded as the empty string. keep_memory=True tells glibc's malloc to keep freed activation memory
    for reuse, process-wide (kernels/malloc.py: bf16 +5-10% here); off unless asked."""
    texts = text_list(texts)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size={batch_size!r} must be an integer >= 1 (or None)")
    if keep_memory:
        keep_freed_memory()
    recipe = Recipe.read(model.source)
    limit = min(x for x in (recipe.max_seq_length, model.max_length()) if x)
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < limit:
        raise InputError(f"batch_tokens={batch_tokens} is below the longest possible text ({limit} tokens, "
                         "max_seq_length): raise it")
    texts = [t.lower() for t in texts] if recipe.lowercase else texts
    encs = tok.encode(texts, truncation=True, max_length=limit)
    out = torch.empty(len(texts), model.config.hidden_size)
    device = next(model.parameters()).device
    for idx in token_batches([len(e.ids) for e in encs], batch_tokens, batch_size):
        batch = {k: v.to(device) for k, v in tok.pad([encs[i] for i in idx]).items()}
        hidden = model(**batch).last_hidden_state
        vecs = pool(hidden.float(), batch["attention_mask"], recipe.pooling)
        out[idx] = (F.normalize(vecs, dim=-1) if recipe.normalize else vecs).cpu()
    return out
