"""RoBERTa = BERT with positions counted from padding_idx + 1, a GELU MLM head and a tanh classifier on <s>."""
from dataclasses import replace

import torch

from ..config import Fields
from ..errors import ConfigError
from .bert import Bert, BertConfig


def roberta_config(c: dict, where: str = "config.json") -> BertConfig:
    """BERT's fields, with pad_token_id required (positions count from it) and a GELU MLM transform."""
    pad = Fields(c, where).int("pad_token_id", 1, min=0, none_ok=True)
    if pad is None:
        raise ConfigError(f"{where}: pad_token_id is null, but RoBERTa numbers its positions from "
                          "pad_token_id + 1: set it (1 in every released RoBERTa)")
    cfg = replace(BertConfig.from_hf(c, where), pad_token_id=pad, mlm_act="gelu")
    if pad + 1 >= cfg.max_positions:
        raise ConfigError(f"{where}: pad_token_id = {pad} leaves no positions: RoBERTa numbers positions from "
                          f"pad_token_id + 1, and max_position_embeddings = {cfg.max_positions} must exceed it "
                          f"(pad_token_id + 2 or more)")
    return cfg


class Roberta(Bert):
    family = "roberta"
    config_from_hf = staticmethod(roberta_config)
    classifier_act = "tanh"

    def max_length(self):
        return self.config.max_positions - self.config.pad_token_id - 1

    def position_ids(self, input_ids):
        # Why: fairseq numbered positions from padding_idx + 1 and gave padding the padding_idx position.
        # transformers derives "padding" from input_ids == pad_token_id (not from the attention mask); so do we.
        real = input_ids.ne(self.config.pad_token_id).long()
        return torch.cumsum(real, dim=1) * real + self.config.pad_token_id
