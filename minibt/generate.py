"""Generation: a preallocated KV cache, one prefill, then one token per step."""
from __future__ import annotations

import torch

from .attention import KVCache, check_mask
from .errors import BackendError, InputError

# The compiled static decode step (minibt/kernels/static_decode.py), registered by minibt.kernels when it is imported:
# kernels sit above generate in the import layers (tests/test_architecture.py), so generate does not import them.
STATIC_DECODE: list = []


MIN_TEMPERATURE = 1e-4      # below it, sampling is greedy decoding in all but name (and logits / T overflow)


def check_options(max_new_tokens, do_sample, temperature, top_k, top_p, seed) -> float:
    """Each generation argument in its range; the error names the argument and the range. Returns the temperature
    as a float (an integer beyond float's range is refused, one within it converted)."""
    def bad(name, value, rule):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:40] + f"... ({len(repr(value))} characters)"
        raise InputError(f"{name}={shown}: {rule}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        bad("max_new_tokens", max_new_tokens, "must be an integer >= 0")
    if not isinstance(do_sample, bool):
        bad("do_sample", do_sample, "must be True or False (a bool; a string such as 'False' is not)")
    try:
        t = float(temperature) if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) else None
    except OverflowError:
        t = None
    if t is None or t != t or t in (float("inf"), float("-inf")):
        bad("temperature", temperature, "must be a finite number")
    if do_sample and t < MIN_TEMPERATURE:
        bad("temperature", temperature, f"must be >= {MIN_TEMPERATURE} when sampling (below it sampling picks the "
                                        "most likely token: use do_sample=False)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        bad("top_k", top_k, "must be an integer >= 1 (or None)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        bad("top_p", top_p, "must be in (0, 1] (or None)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        bad("seed", seed, "must be an integer in [0, 2**64) (or None)")
    return t


def check_model(model):
    """generate needs a decoder with its LM head (head="causal-lm"): a base-head one has no logits to pick from."""
    if not getattr(model, "causal", False):
        raise InputError(f"generate needs a decoder (OPT or Llama); this is a {model.family} encoder")
    if getattr(model, "lm_head", None) is None:
        raise InputError(f"generate needs the causal-LM head; this {model.family} was loaded with head="
                         f"{getattr(model, 'head', None)!r} (no logits): load it with head='causal-lm'")


def check_token_ids(name, value, vocab_size: int, many: bool):
    """eos_token_id (an id or a list of ids; many=True) or pad_token_id (one id), each an int in the vocabulary."""
    ids = value if many and isinstance(value, (list, tuple, set, frozenset)) else [value]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise InputError(f"{name}={value!r}"[:100] + f": must be {'an id or a list of ids' if many else 'an id'}, "
                             f"integers in [0, {vocab_size}) (the vocabulary)")
    return value


def left_pad(input_ids, attention_mask):
    """Decoders continue each row from its last column, so prompts must be left-padded. Right- or holey-padded
    rows are repacked (their real tokens moved, in order, to the right end), never continued from padding."""
    mask = attention_mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"attention_mask rows {empty[:10]} are padding only: each prompt row needs at least one "
                         "real token (a row is never continued from nothing)")
    if not bool((mask[:, 1:] < mask[:, :-1]).any()):          # every row: padding only before its real tokens
        return input_ids, attention_mask
    b, s = input_ids.shape
    ids, out = torch.zeros_like(input_ids), torch.zeros_like(attention_mask)
    for row in range(b):
        real = input_ids[row][mask[row]]
        n = real.numel()
        if n:
            ids[row, s - n:] = real
            out[row, s - n:] = 1
    return ids, out


def pick_next(logits, *, do_sample, temperature, top_k, top_p, generator):
    """logits (B, V) -> (B,) ids. Greedy, or sampling after temperature, top-k, top-p (transformers' order)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1)                  # ascending, as transformers' TopPLogitsWarper
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False                                     # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def special_ids(model, eos_token_id, pad_token_id) -> tuple[set, int]:
    """(the eos ids, the pad id): the arguments checked, else the checkpoint's generation_config.json / config.json;
    no pad id: the smallest eos id (as transformers pads with eos), else 0."""
    defaults = model.generation                     # config.json, then generation_config.json (loading.py)
    if eos_token_id is None:
        eos_token_id = defaults.get("eos_token_id")
    else:
        check_token_ids("eos_token_id", eos_token_id, model.config.vocab_size, True)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = defaults.get("pad_token_id")
    else:
        check_token_ids("pad_token_id", pad_token_id, model.config.vocab_size, False)
    return eos, pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)


def static_step(model, compile, length: int):
    """generate's compile= argument -> (the static_decode module, its mode), or (None, None) for eager steps."""
    if not compile:
        return None, None
    if not STATIC_DECODE:
        raise BackendError("generate(compile=...) needs the static decode step that minibt.kernels registers "
                           "on import (from_hub imports it): import minibt.kernels")
    mode = "default" if compile is True else compile
    STATIC_DECODE[0].check(model, mode, length)
    return STATIC_DECODE[0], mode


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=20, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, seed=None, eos_token_id=None, pad_token_id=None, streamer=None, compile=False):
    """(B, S) prompts, left-padded (right padding is repacked to the left) -> (B, S + new). Rows that produced
    eos_token_id are padded with pad_token_id afterwards, and generation stops when every row has. eos/pad default
    to the checkpoint's generation_config.json or config.json (pass eos_token_id=[] to never stop early). `streamer(ids)` gets each step's (B,) tokens.
    compile: True / "default" or "max-autotune": the decode steps run one compiled static-shape step
    (minibt/kernels/static_decode.py; the prefill stays eager); greedy tokens are the eager ones."""
    check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError("generate needs input_ids as a (batch, prompt length) tensor")
    b, s = input_ids.shape
    if s == 0:
        raise InputError("generate needs a prompt of at least one token")
    attention_mask = check_mask(attention_mask, input_ids.shape, device=input_ids.device)
    input_ids, attention_mask = left_pad(input_ids, attention_mask)
    temperature = check_options(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    limit = model.max_length()
    if s + max_new_tokens > limit:
        raise InputError(f"prompt ({s} tokens) + max_new_tokens ({max_new_tokens}) = {s + max_new_tokens} exceeds "
                         f"the model's {limit} positions (max_position_embeddings in config.json)")
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    generator = None
    if seed is not None:
        generator = torch.Generator(input_ids.device).manual_seed(seed)
    static_decode, mode = static_step(model, compile, s + max_new_tokens)
    cache = (static_decode.new_cache if static_decode else KVCache.for_model)(model, b, s + max_new_tokens)
    mask = attention_mask.long()
    out = model(input_ids, attention_mask=mask, past_key_values=cache, last_only=True)
    logits = out.logits[:, -1]
    static = static_decode.StaticDecoder(model, cache, mask, s + max_new_tokens, mode) if static_decode else None
    seqs, done = [input_ids], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(sorted(eos), device=input_ids.device) if eos else None
    for step in range(max_new_tokens):
        nxt = pick_next(logits.float(), do_sample=do_sample, temperature=temperature, top_k=top_k,
                        top_p=top_p, generator=generator)
        if eos_t is not None:
            nxt = nxt.masked_fill(done, pad)
            done = done | torch.isin(nxt, eos_t)
        seqs.append(nxt[:, None])
        if streamer is not None:
            streamer(nxt)
        if step == max_new_tokens - 1 or (eos_t is not None and bool(done.all())):
            break
        if static is not None:
            logits = static(nxt[:, None])
            continue
        mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        logits = model(nxt[:, None], attention_mask=mask, past_key_values=cache, last_only=True).logits[:, -1]
    if static is not None:
        static.release()
    return torch.cat(seqs, 1)
