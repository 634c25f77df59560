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
    return token_labels(tok, batch["input_ids"][0].tolist()), probs[head].float()


def token_labels(tok, ids) -> list[str]:
    """Readable axis labels: each token decoded on its own (byte-level `Ġcat` -> `cat`, `▁cat` -> `cat`);
    the raw piece where decoding alone gives nothing readable (special tokens, part of a multi-byte character).
    WordPiece continuations keep their `##` (`##ing`), which says that they continue a word."""
    labels = []
    for piece, i in zip(tok.convert_ids_to_tokens(ids), ids):
        text = tok.decode([i], skip_special_tokens=False).strip()
        labels.append(piece if not text or "\ufffd" in text else text)
    return labels


def attention_map(model, tok, text: str, layer: int = 0, head: int = 0, path="attention.png", title=None) -> Path:
    """title: names the model and dtype (default: the model folder's name and the weights' dtype)."""
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
    if title is None:
        source = Path(str(getattr(model, "source", "model")))
        title = f"{source.name}, {str(next(model.parameters()).dtype).removeprefix('torch.')}"
    ax.set_title(f"{title}: layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
