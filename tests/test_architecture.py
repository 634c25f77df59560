"""The shape of the code a reader follows: a forward stays in its family file and attention/, and minibt's parts
import one way (errors, config, hub <- attention <- generate <- models <- kernels <- loading <- embed, encoder,
reranker <- tools)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import minibt
from conftest import left_padded, ragged_batch

ROOT = Path(minibt.__file__).resolve().parent


def traced_files(fn) -> set[str]:
    """minibt files (relative to the package) whose Python functions ran during fn()."""
    seen = set()

    def profile(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(ROOT):
                seen.add(str(path.relative_to(ROOT)))
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def outside(files: set[str], allowed: tuple[str, ...]) -> set[str]:
    return {f for f in files if not (f in allowed or f.startswith("attention/"))}


@pytest.mark.parametrize("attn", ["sdpa", "varlen", "naive"])
def test_a_llama_forward_runs_llama_py_and_attention_alone(tiny_decoder, attn):
    model = minibt.from_hub(tiny_decoder("llama-gqa")[0], attn=attn, optimize=False)
    ids, mask = left_padded(99, 0)
    cache = minibt.attention.KVCache.for_model(model, 3, ids.shape[1] + 1)
    with torch.no_grad():
        files = traced_files(lambda: model(ids, attention_mask=mask, past_key_values=cache,
                                           output_attentions=attn == "naive"))
        step = traced_files(lambda: model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1),
                                          past_key_values=cache))
    assert "models/llama.py" in files and any(f.startswith("attention/") for f in files)
    assert outside(files | step, ("models/llama.py",)) == set()


def test_generate_runs_generate_py_the_family_file_and_attention(tiny_decoder):
    model = minibt.from_hub(tiny_decoder("opt-pre-ln")[0], optimize=False)
    ids, mask = left_padded(99, 1)
    files = traced_files(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=3))
    # models/common.py holds only the `generate` method that hands over to generate.py
    assert outside(files, ("generate.py", "models/opt.py", "models/common.py")) == set()


@pytest.mark.parametrize("arch", ["BertModel", "RobertaForMaskedLM", "DistilBertForSequenceClassification"])
def test_an_encoder_forward_runs_its_family_files_and_attention(tiny, arch):
    model = minibt.from_hub(tiny(arch)[0], attn="varlen", optimize=False)
    ids, mask = ragged_batch(99, 1 if arch.startswith("Roberta") else 0)
    with torch.no_grad():
        files = traced_files(lambda: model(ids, attention_mask=mask))
    family = {"Bert": "models/bert.py", "Robe": "models/roberta.py", "Dist": "models/distilbert.py"}[arch[:4]]
    assert outside(files, ("models/bert.py", family)) == set()


# ---------------------------------------------------------------------------------------------- import layers

LAYERS = [{"errors"}, {"config", "hub"}, {"attention"}, {"generate"}, {"models"}, {"kernels"},
          {"loading", "tokenizer"}, {"embed"}, {"encoder", "reranker"}, {"tools"}]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def imports(path: Path) -> set[str]:
    """The minibt parts (first name under minibt/) that a module imports, lazily or not."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            names = base + (node.module.split(".") if node.module else [])
            out |= {names[0]} if names else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minibt."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minibt.")}
    return out


def test_parts_import_one_way():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        part = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if part not in RANK:
            continue                  # the public faces: __init__, __main__, serve, ray (thin, over tools)
        for other in imports(path) - {part}:
            if other in RANK and RANK[other] > RANK[part]:
                wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert wrong == []
