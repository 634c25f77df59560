"""Mistral = Llama with a causal sliding window of `sliding_window` keys on every layer (Jiang et al., 2023).

The window is read by Llama's config reader (`sliding_windows`: config.json `sliding_window`, on the layers that
`layer_types` marks, or on all of them), and a windowed layer keeps a rolling KV cache of W slots
(attention/cache.py). Everything else, weights included, is Llama's.
"""
from .llama import Llama


class Mistral(Llama):
    family = "mistral"
