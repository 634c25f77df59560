"""`minibt.ray`: embed a Ray Dataset or a corpus on a Ray cluster (extra `minibt[ray]`). See minibt/tools/ray.py;
`import minibt` never imports this module or ray."""
from .tools.ray import Embedder, ShardWriter, embed_corpus, embed_dataset

__all__ = ["Embedder", "ShardWriter", "embed_dataset", "embed_corpus"]
