"""model_type (config.json) -> model class. Each class names its weights map by `family` and reads its config.json
with `config_from_hf(dict, where)`; the loader builds it as `cls(config, head)`."""
from .bert import Bert
from .bloom import Bloom
from .distilbert import DistilBert
from .gemma2 import Gemma2
from .gpt_oss import GptOss
from .llama import Llama
from .mistral import Mistral
from .modernbert import ModernBert
from .mpnet import MPNet
from .nomic_bert import NomicBert
from .opt import OPT
from .qwen import Qwen2, Qwen3
from .roberta import Roberta
from .xlm_roberta import Camembert, XLMRoberta

MODEL_TYPES = {"bert": Bert, "roberta": Roberta, "xlm-roberta": XLMRoberta, "camembert": Camembert,
               "distilbert": DistilBert, "mpnet": MPNet, "modernbert": ModernBert, "nomic_bert": NomicBert,
               "opt": OPT, "llama": Llama, "mistral": Mistral, "qwen2": Qwen2, "qwen3": Qwen3, "gemma2": Gemma2,
               "bloom": Bloom, "gpt_oss": GptOss}

__all__ = ["MODEL_TYPES", "Bert", "Roberta", "XLMRoberta", "Camembert", "MPNet", "ModernBert", "NomicBert",
           "DistilBert", "OPT", "Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2", "Bloom", "GptOss"]
