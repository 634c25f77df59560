"""`minibt.audit` per attention variant and backend: the families that carry each variant, every attention function.

Tiny random checkpoints saved by transformers (the test suite's shapes, with windows shorter than the inputs), loaded
through minibt's loader; each backend runs the same ragged batch and is compared layer by layer with naive in float64
(max relative error of hidden states and attention outputs over real tokens). A backend that cannot compute the
family's variant is refused by name, and says so here.

    python benchmarks/audit_variants.py
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from _report import table, write_section

FAMILIES = [   # (label, transformers class, config, left-padded decoder?)
    ("causal window 4 (Mistral)", "MistralForCausalLM",
     dict(sliding_window=4, num_key_value_heads=2), True),
    ("softcap + local/global (Gemma 2)", "Gemma2ForCausalLM",
     dict(sliding_window=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=2, attn_logit_softcapping=5.0,
          final_logit_softcapping=3.0, num_hidden_layers=3), True),
    ("ALiBi (BLOOM)", "BloomForCausalLM", dict(n_layer=2, n_head=4), True),
    ("relative buckets (MPNet)", "MPNetModel", dict(max_position_embeddings=66), False),
    ("bidirectional window ±2 (ModernBERT)", "ModernBertModel",
     dict(local_attention=4, num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
          sep_token_id=2), False),
]
BASE = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
            max_position_embeddings=64)


def batch(decoder: bool):
    lengths, width = (12, 7, 1), 12
    ids = torch.randint(3, 99, (3, width), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1 if decoder else 0
        if not decoder:
            mask[i, :n] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


def main():
    import transformers
    import minibt
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows, names = [], minibt.attention.functions()
    for label, arch, extra, decoder in FAMILIES:
        config_class = getattr(transformers, arch.replace("ForCausalLM", "Config").replace("Model", "Config"))
        kw = {k: v for k, v in {**BASE, **extra}.items() if not (arch.startswith("Bloom") and k in
                                                                   ("intermediate_size", "num_hidden_layers",
                                                                    "num_attention_heads", "max_position_embeddings"))}
        folder = Path(tempfile.mkdtemp()) / arch
        getattr(transformers, arch)(config_class(**kw)).eval().save_pretrained(folder)
        model = minibt.from_hub(folder)
        result = minibt.audit(model, batch(decoder), names, repeats=1)
        cells = []
        for name in names:
            if name in result.refused:
                cells.append(f"refused ({result.refused[name].removeprefix('cannot compute ')})")
            else:
                s = result.summary[name]
                cells.append(f"{s['max_rel']:.1e}" + ("" if s["first_bad_layer"] is None else " OUT"))
        rows.append([label, ", ".join(sorted(model.variants)), *cells])
        print(rows[-1], flush=True)
    body = ("Max relative error against naive in float64, over every layer's hidden states and attention outputs "
            "(real tokens), fp32 weights; audit's tolerance is 1e-5 (OUT marks a backend past it).\n\n"
            + table(["family", "variants", *names], rows))
    write_section("audit_variants", body)


if __name__ == "__main__":
    main()
