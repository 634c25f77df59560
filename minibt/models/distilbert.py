"""DistilBERT = BERT's layer under other key names (weights_map/distilbert.toml), no token types, no pooler."""
from ..config import Fields
from .bert import Bert, BertConfig
from .common import ACTIVATIONS


def distilbert_config(c: dict, where: str = "config.json") -> BertConfig:
    """DistilBERT's own field names, read into BERT's config."""
    f = Fields(c, where)
    act = f.str("activation", "gelu", choices=tuple(ACTIVATIONS))
    cfg = BertConfig(vocab_size=f.int("vocab_size"), hidden_size=f.int("dim"), num_layers=f.int("n_layers", min=0),
                     num_heads=f.int("n_heads"), intermediate_size=f.int("hidden_dim"), hidden_act=act,
                     max_positions=f.int("max_position_embeddings", 512), type_vocab_size=0,
                     layer_norm_eps=1e-12, pad_token_id=f.int("pad_token_id", 0, min=0, none_ok=True) or 0,
                     mlm_act=act, tie_word_embeddings=f.bool("tie_word_embeddings", True), num_labels=f.labels(),
                     add_pooling_layer=False)
    f.divides("dim", "n_heads", cfg.hidden_size, cfg.num_heads)
    return cfg


class DistilBert(Bert):
    family = "distilbert"
    config_from_hf = staticmethod(distilbert_config)
    classifier_act = "relu"
