"""Sentence embeddings the sentence-transformers way, computed at deployment speed: tokenise once, sort by token
count, batch by a token budget.

A folder saved by sentence-transformers (versions 2 to 6) holds a pipeline, listed in modules.json: the network,
then modules that turn its token vectors into one sentence vector. minibt runs the same modules from the same files:

    Transformer  the network (config.json + safetensors; minibt's from_hub) and its text settings: max_seq_length
                 (sentence_bert_config.json, else tokenizer_config.json's model_max_length), do_lower_case
    Pooling      token vectors -> one vector per text: cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken
                 (several modes: their vectors concatenated); include_prompt=false leaves the prompt's tokens out
    Dense        a linear layer and its activation (Tanh by default), with an optional residual
    LayerNorm    a LayerNorm over the vector
    Normalize    unit length (L2)

Any other module is refused by name, never skipped. config_sentence_transformers.json gives the prompts (a text put
before every input) and default_prompt_name. After the pipeline come SentenceTransformer.encode's own steps, in its
order: truncate_dim (keep the first values: Matryoshka), normalize_embeddings, precision (quantize).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import Fields, read_json
from .errors import CheckpointError, ConfigError, InputError
from .hub import inside
from .kernels.malloc import keep_freed_memory
from .tokenizer import text_list

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The boolean flags sentence-transformers 2-5 wrote in 1_Pooling/config.json, in the order their vectors are
# concatenated. Version 6 writes {"pooling_mode": "mean" | [modes...], "embedding_dimension": H} instead.
POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# Dense's activation_function, saved as the torch.nn class's full name: the ones minibt computes.
DENSE_ACTIVATIONS = {"Tanh": torch.tanh, "Identity": lambda x: x, "ReLU": F.relu, "GELU": F.gelu,
                     "Sigmoid": torch.sigmoid, "SiLU": F.silu}
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


# ------------------------------------------------------------------------------------------------ the modules

@dataclass
class Pooling:
    modes: tuple = ("mean",)
    include_prompt: bool = True

    def __call__(self, hidden, mask, prompt_lengths):
        """hidden (B, S, H) right-padded, mask (B, S), prompt_lengths (B,) -> (B, len(modes) * H)"""
        if not self.include_prompt:                           # the prompt's tokens take no part in the vector
            mask = mask * (torch.arange(mask.shape[1], device=mask.device) >= prompt_lengths[:, None])
        m = mask.unsqueeze(-1).to(hidden.dtype)                                   # (B, S, 1)
        count = m.sum(1).clamp(min=1e-9)                                          # (B, 1) tokens pooled
        rows = torch.arange(len(hidden), device=hidden.device)
        out = []
        for mode in self.modes:
            if mode == "cls":                                 # the first pooled token ([CLS] unless it is prompt)
                out.append(hidden[rows, mask.argmax(1)])
            elif mode == "lasttoken":                         # the last real token (causal embedders)
                last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
                out.append(hidden[rows, last] * m[rows, last])
            elif mode == "max":                               # a text with no token at all pools to zeros
                top = hidden.masked_fill(m == 0, float("-inf")).amax(1)
                out.append(top.clamp(min=torch.finfo(hidden.dtype).min) * (m.sum(1) > 0))
            elif mode == "mean":
                out.append((hidden * m).sum(1) / count)
            elif mode == "mean_sqrt_len_tokens":
                out.append((hidden * m).sum(1) / count.sqrt())
            else:                                             # weightedmean: token t weighs t (1, 2, ...)
                w = m * torch.arange(1, mask.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)[:, None]
                out.append((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9))
        return torch.cat(out, dim=-1)


@dataclass
class Dense:
    weight: torch.Tensor                  # (out, in)
    bias: torch.Tensor | None
    activation: str = "Tanh"
    residual: torch.Tensor | None = None  # (out, in) when use_residual and the widths differ
    use_residual: bool = False

    def __call__(self, x):
        """(B, in) -> (B, out): activation(x W^T + b) (+ x, or x R^T)"""
        y = DENSE_ACTIVATIONS[self.activation](F.linear(x, self.weight.to(x.device), self.bias))
        if self.use_residual:
            y = y + (x if self.residual is None else F.linear(x, self.residual.to(x.device)))
        return y


@dataclass
class LayerNorm:
    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight.to(x.device), self.bias.to(x.device), 1e-5)


class Normalize:
    def __call__(self, x):
        return F.normalize(x, dim=-1)

    def __eq__(self, other):
        return isinstance(other, Normalize)

    def __repr__(self):
        return "Normalize()"


# ------------------------------------------------------------------------------------------------ the pipeline

@dataclass
class Pipeline:
    """What sentence-transformers runs on the network's output, read from the folder it saved."""
    steps: list = field(default_factory=lambda: [Pooling()])     # Pooling, Dense, LayerNorm, Normalize in order
    width: int = 0                                                # the sentence vector's width
    max_seq_length: int | None = None
    lowercase: bool = False
    prompts: dict = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def pooling(self) -> str:
        return "+".join(self.steps[0].modes)

    @property
    def normalize(self) -> bool:
        """True when the vectors come out unit length (the pipeline ends in Normalize)."""
        return isinstance(self.steps[-1], Normalize)

    @classmethod
    def read(cls, folder: Path | None, hidden_size: int) -> "Pipeline":
        """modules.json and every module's files; without modules.json, sentence-transformers' defaults for a plain
        checkpoint (mean pooling) as it would build them."""
        pipe = cls(width=hidden_size)
        if folder is None:
            return pipe
        folder = Path(folder)
        where = folder / "modules.json"
        modules = read_json(inside(folder, "modules.json"), kind=list)
        if modules is None:
            modules = [{"path": "", "type": "Transformer"}, {"path": "1_Pooling", "type": "Pooling"}]
            if not (folder / "1_Pooling" / "config.json").is_file():
                modules = modules[:1]
        if not all(isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path", ""), str)
                   for m in modules):
            raise ConfigError(f"{where}: must be a list of objects with a 'type' and a 'path'")
        if not modules or modules[0]["type"].rsplit(".", 1)[-1] != "Transformer" or modules[0].get("path", ""):
            raise ConfigError(f"{where}: the first module must be a Transformer at path '' (the network in this "
                              f"folder); found {modules[0] if modules else 'none'}")
        pipe.steps = []
        for i, m in enumerate(modules[1:], 1):
            kind, path = m["type"].rsplit(".", 1)[-1], m.get("path", "")
            reader = {"Pooling": _pooling, "Dense": _dense, "LayerNorm": _layer_norm, "Normalize": _normalize}.get(kind)
            if reader is None:
                raise ConfigError(f"{where}: module {i} is {m['type']!r} (path {path!r}); minibt runs Transformer, "
                                  "Pooling, Dense, LayerNorm and Normalize and refuses any other rather than skip it")
            step, pipe.width = reader(folder, path, pipe.width)
            pipe.steps.append(step)
        if not pipe.steps or not isinstance(pipe.steps[0], Pooling):
            pipe.steps.insert(0, Pooling())                # a network alone: mean pooling, as sentence-transformers
        if sum(isinstance(s, Pooling) for s in pipe.steps) > 1:
            raise ConfigError(f"{where}: more than one Pooling module")
        pipe.max_seq_length, pipe.lowercase = text_settings(folder)
        pipe.prompts, pipe.default_prompt_name = _prompts(folder)
        return pipe

    def unnormalized(self) -> "Pipeline":
        """The same pipeline without its final Normalize (a server normalises when its client asks)."""
        return replace(self, steps=self.steps[:-1]) if self.normalize else self

    def prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The text put before each input, chosen as SentenceTransformer.encode does: `prompt` if given, else the
        prompt named `prompt_name`, else the checkpoint's default_prompt_name's, else none."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise InputError(f"prompt_name={prompt_name!r}: this model's prompts are {sorted(self.prompts)} "
                                 "(config_sentence_transformers.json)")
            return self.prompts[prompt_name]
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""

    def __call__(self, hidden, mask, prompt_lengths):
        """hidden (B, S, H) right-padded, mask (B, S), prompt_lengths (B,) -> (B, width): every module in order."""
        x = self.steps[0](hidden, mask, prompt_lengths)
        for step in self.steps[1:]:
            x = step(x)
        return x


def text_settings(folder: Path) -> tuple:
    """sentence_bert_config.json's (max_seq_length or None, do_lower_case)."""
    st = Fields(read_json(inside(folder, "sentence_bert_config.json")) or {}, str(folder / "sentence_bert_config.json"))
    return st.int("max_seq_length", None, none_ok=True), st.bool("do_lower_case", False)


def _module_config(folder, path, what):
    return Fields(read_json(inside(folder, f"{path}/config.json"), required=what != "Normalize") or {},
                  str(folder / path / "config.json"))


def _module_weights(folder, path, shapes: dict) -> dict:
    """{name: tensor} from a module's model.safetensors, every name present with its shape. Never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    file = inside(folder, f"{path}/model.safetensors")
    if not file.is_file():
        pickled = folder / path / "pytorch_model.bin"
        raise CheckpointError(f"{pickled if pickled.exists() else file}: no model.safetensors for this module"
                              + ("; minibt never unpickles checkpoint files: re-save it with sentence-transformers"
                                 " (safe_serialization=True)" if pickled.exists() else ""))
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    for name, shape in shapes.items():
        if name not in tensors:
            raise CheckpointError(f"{file}: no tensor {name!r} (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{file}: {name!r} has shape {tuple(tensors[name].shape)}, the module's "
                                  f"config.json says {shape}")
    return {name: tensors[name].float() for name in shapes}


def _pooling(folder, path, width):
    c = _module_config(folder, path, "Pooling")
    dim = c.c.get("embedding_dimension", c.c.get("word_embedding_dimension"))
    if dim is not None and dim != width:
        raise ConfigError(f"{c.where}: embedding_dimension {dim} is not the network's hidden size {width}")
    modes = c.c.get("pooling_mode")
    if modes is None:                                   # the older format: one boolean per mode (none: mean)
        modes = [mode for flag, mode in POOLING_FLAGS.items() if c.bool(flag, False)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else modes
    if not isinstance(modes, list) or not modes or any(m not in POOLING_MODES for m in modes):
        raise ConfigError(f"{c.where}: pooling_mode {c.c.get('pooling_mode')!r} is not supported; the modes are "
                          f"{', '.join(POOLING_MODES)}")
    return Pooling(tuple(modes), c.bool("include_prompt", True)), len(modes) * width


def _dense(folder, path, width):
    c = _module_config(folder, path, "Dense")
    n_in, n_out, bias = c.int("in_features"), c.int("out_features"), c.bool("bias", True)
    if n_in != width:
        raise ConfigError(f"{c.where}: in_features {n_in} is not the width reaching it ({width})")
    _only_sentence_embedding(c)
    name = c.str("activation_function", "torch.nn.modules.activation.Tanh")
    act = name.rsplit(".", 1)[-1]
    if not name.startswith("torch.") or act not in DENSE_ACTIVATIONS:
        raise ConfigError(f"{c.where}: activation_function {name!r} is not supported; minibt computes torch.nn's "
                          f"{', '.join(DENSE_ACTIVATIONS)}")
    residual = c.bool("use_residual", False)
    shapes = {"linear.weight": (n_out, n_in)} | ({"linear.bias": (n_out,)} if bias else {}) \
        | ({"residual.weight": (n_out, n_in)} if residual and n_in != n_out else {})
    w = _module_weights(folder, path, shapes)
    return Dense(w["linear.weight"], w.get("linear.bias"), act, w.get("residual.weight"), residual), n_out


def _layer_norm(folder, path, width):
    c = _module_config(folder, path, "LayerNorm")
    if c.int("dimension") != width:
        raise ConfigError(f"{c.where}: dimension {c.c['dimension']} is not the width reaching it ({width})")
    w = _module_weights(folder, path, {"norm.weight": (width,), "norm.bias": (width,)})
    return LayerNorm(w["norm.weight"], w["norm.bias"]), width


def _normalize(folder, path, width):
    _only_sentence_embedding(_module_config(folder, path, "Normalize"))
    return Normalize(), width


def _only_sentence_embedding(c: Fields):
    for key in ("module_input_name", "module_output_name"):
        if c.c.get(key, "sentence_embedding") not in ("sentence_embedding", None):
            raise ConfigError(f"{c.where}: {key} {c.c[key]!r}: minibt computes sentence vectors only "
                              "('sentence_embedding')")


def _prompts(folder):
    """config_sentence_transformers.json's prompts, over sentence-transformers' own {query: '', document: ''}."""
    where = str(folder / "config_sentence_transformers.json")
    c = Fields(read_json(inside(folder, "config_sentence_transformers.json")) or {}, where)
    saved = c.c.get("prompts") or {}
    if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in saved.items()):
        raise ConfigError(f"{where}: prompts must map names to strings")
    default = c.c.get("default_prompt_name")
    prompts = {"query": "", "document": ""} | saved
    if default is not None and default not in prompts:
        raise ConfigError(f"{where}: default_prompt_name {default!r} is not one of its prompts {sorted(prompts)}")
    return prompts, default


# ------------------------------------------------------------------------------------------------ after it

def check_dim(truncate_dim: int | None, width: int):
    if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                     or not 1 <= truncate_dim <= width):
        raise InputError(f"truncate_dim={truncate_dim!r} must be an integer from 1 to {width} (this model's width)")


def truncate(vecs, truncate_dim: int | None, width: int):
    """The first truncate_dim values of each vector (Matryoshka models are trained for it)."""
    check_dim(truncate_dim, width)
    return vecs if truncate_dim is None else vecs[..., :truncate_dim]


def quantize(vecs: torch.Tensor, precision: str) -> np.ndarray:
    """(N, D) float vectors -> sentence-transformers' quantize_embeddings: float32; int8 / uint8 (per dimension, 256
    buckets between that dimension's min and max over these N vectors); binary / ubinary (one bit per value: > 0,
    packed 8 to a byte; binary shifts each byte by -128 into int8)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}")
    x = vecs.float().cpu().numpy()
    if precision == "float32":
        return x
    if precision.endswith("binary"):
        bits = np.packbits(x > 0, axis=-1)
        return (bits - 128).astype(np.int8) if precision == "binary" else bits
    if len(x) < 2:
        raise InputError(f"precision={precision!r} calibrates each dimension's range over the texts of the call: "
                         "give at least 2 texts")
    start, stop = x.min(0), x.max(0)
    step = (stop - start) / 255
    step = np.where(step == 0, 1, step)
    q = np.clip(np.floor((x - start) / step), 0, 255)
    return (q - 128).astype(np.int8) if precision == "int8" else q.astype(np.uint8)


def as_requested(rows, single: bool, convert_to_numpy: bool, convert_to_tensor: bool):
    """sentence-transformers' output forms: a tensor (convert_to_tensor), else numpy (convert_to_numpy), else a list
    of 1-D tensors; one input (single) gives its one row."""
    rows = rows[0] if single else rows
    if convert_to_tensor:
        return rows
    if convert_to_numpy:
        return rows.numpy()
    return rows if single else list(rows)


# ------------------------------------------------------------------------------------------------ embed

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


def text_limit(model, tok, pipeline: Pipeline) -> int:
    """Tokens per text: max_seq_length (else the tokenizer's model_max_length), never past the model's positions."""
    return min(x for x in (pipeline.max_seq_length or tok.model_max_length, model.max_length()) if x)


def prompt_length(tok, prompt: str) -> int:
    """The prompt's tokens at the start of each text, a trailing special token ([SEP], </s>) not counted."""
    if not prompt:
        return 0
    enc = tok.encode([prompt])[0]
    return len(enc.ids) - (1 if enc.special_tokens_mask and enc.special_tokens_mask[-1] else 0)


BATCH_TOKENS = 4096        # the default token budget of one forward (measured), raised to a model's longest text


@torch.inference_mode()
def embed(model, tok, texts, batch_size: int | None = None, batch_tokens: int | None = None,
          keep_memory: bool = False, *, prompt_name: str | None = None, prompt: str | None = None,
          truncate_dim: int | None = None, pipeline: Pipeline | None = None) -> torch.Tensor:
    """(N, width) float32 vectors in the order of `texts` (a list of strings; a single string is one text: (1, width)),
    through the checkpoint's sentence-transformers pipeline (module docstring). prompt / prompt_name: the text put
    before each input (the checkpoint's default prompt when neither is given); truncate_dim: keep the first values.
    Texts longer than max_seq_length are truncated to it, as sentence-transformers does. batch_tokens caps rows x
    longest row of one forward (None: 4096, or the longest possible text when that is longer). keep_memory=True tells
    glibc's malloc to keep freed activation memory for reuse, process-wide (kernels/malloc.py); off unless asked."""
    texts = text_list(texts)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size={batch_size!r} must be an integer >= 1 (or None)")
    if keep_memory:
        keep_freed_memory()
    pipeline = pipeline or Pipeline.read(model.source, model.config.hidden_size)
    check_dim(truncate_dim, pipeline.width)                                     # before any work
    limit = text_limit(model, tok, pipeline)
    if batch_tokens is None:                        # the default never refuses: at least the longest possible text
        batch_tokens = max(BATCH_TOKENS, limit)
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < limit:
        raise InputError(f"batch_tokens={batch_tokens} is below the longest possible text ({limit} tokens, "
                         "max_seq_length): raise it")
    before = pipeline.prompt(prompt_name, prompt)
    texts = [before + t for t in texts]
    texts = [t.lower() for t in texts] if pipeline.lowercase else texts
    skip = prompt_length(tok, before.lower() if pipeline.lowercase else before)
    encs = tok.encode(texts, truncation=True, max_length=limit)
    out = torch.empty(len(texts), pipeline.width)
    device = next(model.parameters()).device
    for idx in token_batches([len(e.ids) for e in encs], batch_tokens, batch_size):
        batch = {k: v.to(device) for k, v in tok.pad([encs[i] for i in idx]).items()}
        hidden = model(**batch).last_hidden_state
        skips = torch.full((len(idx),), skip, device=device)
        out[idx] = pipeline(hidden.float(), batch["attention_mask"], skips).cpu()
    return truncate(out, truncate_dim, pipeline.width)
