"""Sentence embeddings the sentence-transformers way: its pooling and Normalize modules, read from the checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError


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
        modules = _json(folder / "modules.json") or []
        pool_dir = next((m.get("path") for m in modules if m.get("type", "").endswith("Pooling")), "1_Pooling")
        pool = _json(folder / pool_dir / "config.json") or {}
        modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens") if pool.get(f"pooling_mode_{m}")]
        if len(modes) > 1 or modes and modes[0] == "mean_sqrt_len_tokens":
            raise ConfigError(f"{folder / pool_dir / 'config.json'}: pooling {modes} is not supported (one of cls, mean, max)")
        if modes:
            recipe.pooling = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[modes[0]]
        recipe.normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        st = _json(folder / "sentence_bert_config.json") or {}
        recipe.max_seq_length = st.get("max_seq_length")
        recipe.lowercase = bool(st.get("do_lower_case", False))
        return recipe


def pool(hidden, mask, how: str):
    """hidden (B, S, H), mask (B, S) -> (B, H)"""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if how == "cls":
        return hidden[:, 0]
    if how == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed(model, tok, texts, batch_size: int = 32) -> torch.Tensor:
    """(N, H) float32 vectors in the order of `texts`."""
    recipe = Recipe.read(getattr(model, "source", None))
    texts = [t.lower() for t in texts] if recipe.lowercase else list(texts)
    limit = min(x for x in (recipe.max_seq_length, model.max_length()) if x)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        batch = tok([texts[i] for i in idx], truncation=True, max_length=limit)
        batch = {k: v.to(model_device(model)) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        vecs = pool(hidden.float(), batch["attention_mask"], recipe.pooling)
        out[idx] = F.normalize(vecs, dim=-1).cpu() if recipe.normalize else vecs.cpu()
    return out


def model_device(model):
    return next(model.parameters()).device


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None
