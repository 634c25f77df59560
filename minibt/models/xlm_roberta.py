"""XLM-RoBERTa (Conneau et al., 2020) and CamemBERT (Martin et al., 2020) are RoBERTa's network with another
vocabulary (a SentencePiece model of 250k / 32k pieces): the same code, the same key names."""
from .roberta import Roberta


class XLMRoberta(Roberta):
    family = "xlm-roberta"


class Camembert(Roberta):
    family = "camembert"
