"""A heatmap of what one head attends to, with the tokens on both axes (needs matplotlib: minibt[plot])."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, MinibtError


def attention_probs(model, tok, text: str, layer: int, head: int):
    """(tokens, (S, S) probabilities) of one layer and head, from the naive backend (the spec)."""
    batch = tok([text])
    n_layers = len(model.layers)
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    saved = model.attn
    try:
        with torch.inference_mode():
            out = model.set_attention("naive")(**batch, output_attentions=True)
    finally:
        model.set_attention(saved)
    probs = out.attentions[layer][0]
    if not 0 <= head < probs.shape[0]:
        raise InputError(f"head {head} out of range: layer {layer} has {probs.shape[0]} heads (0..{probs.shape[0] - 1})")
    return tok.convert_ids_to_tokens(batch["input_ids"][0]), probs[head].float()


def attention_map(model, tok, text: str, layer: int = 0, head: int = 0, path="attention.png") -> Path:
    tokens, probs = attention_probs(model, tok, text, layer, head)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinibtError("attention maps need matplotlib: pip install 'minibt[plot]'") from None
    size = max(4.0, 0.35 * len(tokens) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
