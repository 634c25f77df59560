"""Generation: a preallocated KV cache, one prefill, then one token per step."""
from __future__ import annotations

from typing import Callable

import torch

from .errors import InputError


class KVCache:
    """Keys and values of every layer, preallocated: (layers, B, Hkv, max_len, D) each; `length` positions filled.

    Stored in the padded (B, S) layout. A packed prefill (varlen) is unpacked into it once per layer, and decode
    steps append one column.
    """

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        layers, kv_heads, head_dim = model.kv_shape()
        p = model.embed.weight
        return cls(layers, batch, kv_heads, max_len, head_dim, p.dtype, p.device)

    def writer(self, layer: int, packing=None) -> Callable:
        """fn(k, v) -> the keys and values this layer's attention reads, after storing the new ones."""
        start = self.length

        def write(k, v):                                        # k, v: (B, Hkv, S, D), or packed (1, Hkv, T, D)
            if packing is not None:
                for cache, new in ((self.k, k), (self.v, v)):
                    padded = packing.unpack(new.transpose(1, 2)).transpose(1, 2)         # (B, Hkv, S, D)
                    cache[layer, :, :, start:start + padded.shape[2]] = padded
                return k, v                                     # the packed prefill attends its own packed tokens
            end = start + k.shape[2]
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        return write


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


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=20, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, seed=None, eos_token_id=None, pad_token_id=None, streamer=None):
    """(B, S) left-padded prompts -> (B, S + new). Rows that produced eos_token_id are padded with pad_token_id
    afterwards, and generation stops when every row has. eos/pad default to the checkpoint's generation_config.json
    or config.json (pass eos_token_id=[] to never stop early). `streamer(ids)` gets each step's (B,) tokens."""
    b, s = input_ids.shape
    if s == 0:
        raise InputError("generate needs a prompt of at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                         f"{tuple(input_ids.shape)}")
    limit = model.max_length()
    if s + max_new_tokens > limit:
        raise InputError(f"prompt ({s} tokens) + max_new_tokens ({max_new_tokens}) = {s + max_new_tokens} exceeds "
                         f"the model's {limit} positions (max_position_embeddings in config.json)")
    if do_sample and temperature <= 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
    defaults = getattr(model, "generation", {})     # config.json, then generation_config.json (hub.py)
    if eos_token_id is None:
        eos_token_id = defaults.get("eos_token_id")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = defaults.get("pad_token_id")
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)     # as transformers: pad with eos
    generator = None
    if seed is not None:
        generator = torch.Generator(input_ids.device).manual_seed(seed)
    cache = KVCache.for_model(model, b, s + max_new_tokens)
    mask = attention_mask.long()
    out = model(input_ids, attention_mask=mask, past_key_values=cache, last_only=True)
    seqs, done = [input_ids], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(sorted(eos), device=input_ids.device) if eos else None
    for step in range(max_new_tokens):
        nxt = pick_next(out.logits[:, -1].float(), do_sample=do_sample, temperature=temperature, top_k=top_k,
                        top_p=top_p, generator=generator)
        if eos_t is not None:
            nxt = nxt.masked_fill(done, pad)
            done = done | torch.isin(nxt, eos_t)
        seqs.append(nxt[:, None])
        if streamer is not None:
            streamer(nxt)
        if step == max_new_tokens - 1 or (eos_t is not None and bool(done.all())):
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        out = model(nxt[:, None], attention_mask=mask, past_key_values=cache, last_only=True)
    return torch.cat(seqs, 1)
