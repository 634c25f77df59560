"""What OPT and Llama share: the causal forward with left padding, the KV cache hook, the LM head, generate()."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendError, InputError
from .common import Batch, Model, Output, check_inputs


class DecodeLinear(nn.Linear):
    """nn.Linear with faster paths for the few-token products of bf16 decoding. Measured on this CPU (torch 2.13),
    all linear layers of one SmolLM2-135M step: 1 token via torch.mv 16 ms vs 23 ms via linear; 2-16 tokens as
    W @ x^T 16 ms vs 23-26 ms (linear's small-M bf16 path is slow), its output copied back to row-major: a
    column-major q sends SDPA to its math path (a bf16 batch-4 step took 32 ms instead of 25 ms). fp32 and larger
    batches: plain linear."""

    def forward(self, x):
        w, k = self.weight, self.in_features
        if w.dtype != torch.bfloat16 or not 0 < x.numel() <= 16 * k:
            return F.linear(x, w, self.bias)
        if x.numel() == k:
            y = torch.mv(w, x.reshape(k))
        else:
            y = torch.mm(w, x.reshape(-1, k).t()).t().contiguous()
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], self.out_features)


class Decoder(Model):
    """Subclasses define inputs(ids, positions) -> x, layers, final(x), lm_head, and rope(positions) if they use it."""

    heads = ("base", "causal-lm")

    def max_length(self) -> int:
        return self.config.max_positions

    def set_attention(self, name: str):
        if name == "fused":
            raise BackendError(f"attn='fused' is torch's fused encoder layer, for encoders (BERT, RoBERTa, "
                               f"DistilBERT); {self.family} is a decoder: use 'varlen', 'sdpa' or 'auto'")
        return super().set_attention(name)

    def tied(self):
        return {"lm_head.weight": "embed.weight"} if self.lm_head is not None and self.config.tie_word_embeddings else {}

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, Hkv, D): what a KV cache must hold."""
        return self.config.num_layers, self.config.num_kv_heads, self.config.head_dim

    def column_major(self, dtype) -> set[str]:
        """fp32 weights kept transposed in memory (same shape, other strides). A decode step multiplies one token
        by every weight, and MKL's fp32 GEMV streams an (in, out) row-major matrix faster than an (out, in) one:
        SmolLM2-135M's linear layers of one step took 18.8 ms instead of 24.3 ms in isolation, and a whole decode
        step 28.3 ms instead of 31.5 ms. (bf16: see DecodeLinear.)"""
        if dtype != torch.float32:
            return set()
        names = {f"{name}.weight" for name, mod in self.named_modules() if isinstance(mod, nn.Linear)}
        return names | {"embed.weight"}

    def rope(self, positions):
        return ()                                    # extra per-layer arguments derived from positions

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                output_attentions=False, last_only=False) -> Output:
        """input_ids (B, S); attention_mask (B, past + S) covering cached and new tokens (left padding);
        past_key_values: a KVCache (generate.py) that this call reads and extends."""
        cache = past_key_values
        past = cache.length if cache is not None else 0
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, past + s, dtype=torch.long, device=input_ids.device)
        if attention_mask.dim() != 2 or attention_mask.shape != (b, past + s):
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"(batch, cached + new tokens) = {(b, past + s)}")
        check_inputs(input_ids, None, vocab_size=self.config.vocab_size, max_length=self.max_length() - past)
        if position_ids is None:   # left padding: a row's first real token is position 0
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]
        backend = self.route(attention_mask, output_attentions)
        attend, probs = self.bind(backend, output_attentions)
        # Only a prefill is packed; a decode step reads the padded KV cache (one query per row).
        batch = Batch(attention_mask, (b, s), packed=backend.packed and past == 0, causal=True, q_offset=past)
        positions = batch.pack(position_ids)
        x = self.inputs(batch.pack(input_ids), positions)
        extra = self.rope(positions)
        for i, layer in enumerate(self.layers):
            kv = cache.writer(i, batch.packing) if cache is not None else None
            x = layer(x, batch.mask, attend, kv, *extra)
        if cache is not None:
            cache.length += s
        x = self.final(x)
        if last_only:
            x = batch.unpack(x)[:, -1:]                                  # left padding: the last column is real
            logits = self.lm_head(x) if self.lm_head is not None else None
        else:
            logits = batch.unpack(self.lm_head(x)) if self.lm_head is not None else None
            x = batch.unpack(x)
        return Output(x, logits, attentions=tuple(probs) if probs is not None else None, past_key_values=cache)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Prompt + new tokens, like transformers' generate; see minibt.generate.generate for the options."""
        from ..generate import generate
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)
