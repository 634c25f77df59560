"""transformers as a `minibt bench` contender (`--with benchmarks.hf_contenders`): eager and sdpa BertModel on the
same weights as minibt. It lives here, not in minibt/, because minibt never imports transformers."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from minibt.tools.bench import SHAPES

_keep = []     # temporary checkpoint folders live as long as the process


def contenders(model: str, dtype):
    import transformers
    # transformers' own loading bars and warnings would interleave with minibt bench's progress bar
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if model in SHAPES:
        tmp = tempfile.TemporaryDirectory()
        _keep.append(tmp)
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig(**SHAPES[model])).save_pretrained(tmp.name)
        folder = Path(tmp.name)
    else:
        from minibt.hub import resolve
        folder = resolve(model)
    out = {}
    for impl in ("eager", "sdpa"):
        ref = transformers.AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation=impl).eval()
        out[f"transformers {impl}"] = lambda ids, mask, ref=ref: ref(input_ids=ids, attention_mask=mask)
    return folder, out
