"""A heatmap of what one head attends to, with the tokens on both axes (needs matplotlib: minibt[plot])."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, MinibtError
from ..outputs import atomic, check_target


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
    """title: names the model and dtype (default: the model folder's name and the weights' dtype). path: its
    folder must exist and its extension be an image format matplotlib writes (.png, .pdf, .svg, ...), checked before
    any work; written atomically, never through a link."""
    plt = _pyplot("attention maps")
    path, kind = image_path(path)
    tokens, probs = attention_probs(model, tok, text, layer, head)
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
    with atomic(path) as tmp:
        fig.savefig(tmp, format=kind, dpi=100)
    plt.close(fig)
    return path


def _pyplot(what: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinibtError(f"{what} need matplotlib: pip install 'minibt[plot]'") from None
    return plt


def image_path(path) -> tuple[Path, str]:
    """(path, format) for an image output: an extension matplotlib writes, a folder that exists, not a link."""
    from matplotlib.backend_bases import FigureCanvasBase
    path = Path(path)
    kinds = FigureCanvasBase.get_supported_filetypes()
    kind = path.suffix.lower().removeprefix(".")
    if kind not in kinds:
        raise InputError(f"output {path}: extension {path.suffix or '(none)'!r} is not an image format; use one of "
                         f"{', '.join('.' + k for k in sorted(kinds))}")
    return check_target(path), kind


# ---------------------------------------------------------------------------------------------- variant masks

def variant_masks(length: int = 16) -> dict:
    """{name: (title, (Sq, Skv) array: bool where a query may attend, or the additive bias where it may)}: each
    attention variant as the models use it, drawn from minibt's own AttnMask (what every backend reads)."""
    import math
    from ..attention import AttnMask, RelativeBias
    from ..models.mpnet import mpnet_bucket
    heads = 8
    slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])
    cases = {
        "causal": ("causal (every decoder)", AttnMask(causal=True)),
        "window-causal": ("causal sliding window W=4 (Mistral, Gemma 2 local, gpt-oss)",
                          AttnMask(causal=True).with_variants(window=(3, 0))),
        "window-bidirectional": ("bidirectional window ±2 (ModernBERT local layers)",
                                 AttnMask().with_variants(window=(2, 2))),
        "alibi": (f"ALiBi bias, head 0 of {heads} (slope {slopes[0]:.2f}; BLOOM: causal)",
                  AttnMask(causal=True).with_variants(alibi=slopes)),
        "relative": ("relative-position buckets, head 0 (MPNet, a random table)",
                     AttnMask().with_variants(relative=RelativeBias(torch.randn(32, heads, generator=torch.Generator()
                                                                               .manual_seed(0)), mpnet_bucket))),
    }
    out = {}
    local, glob = (cases[n][1].allowed(length, length)[0, 0].float() for n in ("window-causal", "causal"))
    gap = torch.full((length, 1), 0.5)                       # a grey column between the two layers
    out["local-global"] = ("alternating layers (Gemma 2, gpt-oss): local W=4 | global", torch.cat([local, gap, glob], 1))
    for name, (title, mask) in cases.items():
        allowed = mask.allowed(length, length)
        allowed = torch.ones(length, length, dtype=torch.bool) if allowed is None else allowed[0, 0]
        bias = mask.score_bias(length, length)
        picture = allowed.float() if bias is None else bias[0, 0].masked_fill(~allowed, math.nan)
        out[name] = (title, picture)
    return out


def mask_pictures(folder, length: int = 16) -> list[Path]:
    """One PNG per attention variant in `folder` (needs matplotlib): white = attend, dark = masked; a bias is a
    heatmap, with masked cells blank. The folder is made if missing; the folder it goes in must exist."""
    plt = _pyplot("mask pictures")
    folder = output_folder(folder)
    paths = []
    for name, (title, picture) in variant_masks(length).items():
        fig, ax = plt.subplots(figsize=(8.4 if name == "local-global" else 4.2, 4.2))
        is_bias = name in ("alibi", "relative")
        im = ax.imshow(picture.numpy(), cmap="viridis" if is_bias else "gray", vmin=None if is_bias else 0.0)
        if is_bias:
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_title(title, fontsize=8)
        fig.tight_layout()
        paths.append(folder / f"mask-{name}.png")
        with atomic(paths[-1]) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
    return paths


def output_folder(folder) -> Path:
    """A report folder (audit --out, attend-map --masks): made if missing, but the folder it goes in must exist;
    refused if it is a file or a link."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise InputError(f"output folder {folder} is {'a link' if folder.is_symlink() else 'not a folder'}; refused")
    if not folder.parent.is_dir():
        raise InputError(f"output folder {folder}: the folder {folder.parent} does not exist")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot make output folder {folder}: {e.strerror or e}") from None
    return folder
