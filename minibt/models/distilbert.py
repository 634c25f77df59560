"""DistilBERT = BERT's layer under other key names (weights_map/distilbert.toml), no token types, no pooler."""
from .bert import Bert, BertConfig


class DistilBertConfig(BertConfig):
    @classmethod
    def from_hf(cls, c: dict) -> BertConfig:
        act = c.get("activation", "gelu")
        return BertConfig(c["vocab_size"], c["dim"], c["n_layers"], c["n_heads"], c["hidden_dim"], act,
                          c.get("max_position_embeddings", 512), type_vocab_size=0, layer_norm_eps=1e-12,
                          pad_token_id=c.get("pad_token_id", 0), mlm_act=act,
                          tie_word_embeddings=c.get("tie_word_embeddings", True))


class DistilBert(Bert):
    family = "distilbert"
    config_class = DistilBertConfig
    classifier_act = "relu"
    has_pooler = False
