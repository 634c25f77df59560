"""`minibt.ray_data`: embed a Ray Dataset or a corpus on a Ray cluster (extra `minibt[ray]`). Named apart from the
`ray` package it wraps; the code lives in minibt/tools/ray.py. `import minibt` never imports this module or ray."""
from .tools import ray as _impl

if _impl.ray is None:
    raise ImportError(_impl.MISSING)

from .tools.ray import Embedder, ShardWriter, embed_corpus, embed_dataset  # noqa: E402

__all__ = ["Embedder", "ShardWriter", "embed_dataset", "embed_corpus"]
