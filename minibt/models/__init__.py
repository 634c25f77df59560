"""model_type (config.json) -> model class. Each class names its weights map by `family`."""
from .bert import Bert
from .distilbert import DistilBert
from .kv_cache import KVCache
from .llama import Llama
from .opt import OPT
from .roberta import Roberta

MODEL_TYPES = {"bert": Bert, "roberta": Roberta, "distilbert": DistilBert, "opt": OPT, "llama": Llama}

__all__ = ["MODEL_TYPES", "Bert", "Roberta", "DistilBert", "OPT", "Llama", "KVCache"]
