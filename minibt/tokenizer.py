"""Tokenizers over the `tokenizers` library: tokenizer.json, or vocab.txt (WordPiece) / vocab.json + merges.txt."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from tokenizers import Tokenizer as _Tokenizer
from tokenizers import processors

from .config import read_json
from .errors import ConfigError, InputError
from .hub import inside, resolve


def text_list(texts, pairs: bool = False) -> list:
    """A list of texts, checked: a single string is one text (never one text per character); with pairs=True an item
    may also be a (text, text) pair."""
    if isinstance(texts, str):
        return [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}") from None
    def ok(t):
        return isinstance(t, str) or (pairs and isinstance(t, (tuple, list)) and len(t) == 2
                                      and all(isinstance(x, str) for x in t))
    bad = next((i for i, t in enumerate(texts) if not ok(t)), None)
    if bad is not None:
        raise InputError(f"texts[{bad}] is a {type(texts[bad]).__name__}, not a string"
                         + (" or a (text, text) pair" if pairs else ""))
    return [tuple(t) if isinstance(t, list) else t for t in texts]


class Tokenizer:
    """Call it on a list of texts: right-padded tensors like transformers' tokenizers (return_tensors="pt")."""

    def __init__(self, tok: _Tokenizer, config: dict, folder: Path, type_ids: bool):
        # Some tokenizer.json files carry fixed padding/truncation (e.g. pad to 128): we pad to the longest
        # text of the batch and truncate only when asked, as transformers' tokenizers do.
        tok.no_padding()
        tok.no_truncation()
        self.tok, self.config, self.folder, self.type_ids = tok, config, folder, type_ids
        # Thread safety: the Rust tokenizer's truncation is state on the object, so it is never toggled on the
        # shared one. Each max_length gets its own truncating copy, made once and never changed afterwards.
        self._truncating: dict[tuple, _Tokenizer] = {}
        self._lock = threading.Lock()
        self.pad_token_id = self._id(config.get("pad_token")) if config.get("pad_token") else None
        limit = config.get("model_max_length")
        self.model_max_length = limit if isinstance(limit, int) and limit < 1e9 else None

    def _id(self, token):
        token = token["content"] if isinstance(token, dict) else token
        return self.tok.token_to_id(token)

    def token_id(self, name: str) -> int | None:
        """The id of a special token named in tokenizer_config.json, e.g. token_id("mask_token")."""
        token = self.config.get(name)
        return None if token is None else self._id(token)

    def encode(self, texts, *, truncation=False, max_length=None, add_special_tokens=True, direction="right"):
        """Encodings of texts: a list of strings (a single string is one text) or of (text, text) pairs
        (cross-encoders); direction="left" truncates from the start, keeping a text's end. Thread-safe."""
        texts = text_list(texts, pairs=True)
        tok = self.tok
        if truncation:
            limit = max_length or self.model_max_length
            if limit is None:
                raise InputError(f"{self.folder}: truncation=True needs max_length (tokenizer_config.json has no "
                                 "model_max_length)")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise InputError(f"max_length={limit!r} must be an integer >= 1")
            if direction not in ("right", "left"):
                raise InputError(f"direction={direction!r}: must be 'right' or 'left'")
            tok = self._truncating_copy(limit, direction)
        try:
            return tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        except Exception as e:      # the tokenizers library raises its own bare Exception
            raise InputError(f"{self.folder}: the tokenizer could not encode the input ({e})") from None

    def _truncating_copy(self, limit: int, direction: str) -> _Tokenizer:
        with self._lock:
            if (limit, direction) not in self._truncating:
                copy = _Tokenizer.from_str(self.tok.to_str())
                copy.no_padding()
                try:
                    copy.enable_truncation(limit, direction=direction)
                except Exception as e:
                    raise InputError(f"max_length={limit}: {e}") from None
                self._truncating[(limit, direction)] = copy
            return self._truncating[(limit, direction)]

    def __call__(self, texts, *, truncation=False, max_length=None, add_special_tokens=True, padding_side="right"):
        encs = self.encode(texts, truncation=truncation, max_length=max_length, add_special_tokens=add_special_tokens)
        return self.pad(encs, padding_side=padding_side)

    def pad(self, encs, padding_side="right") -> dict:
        """Encodings (from encode) -> padded tensors: input_ids, attention_mask (+ token_type_ids)."""
        if padding_side not in ("right", "left"):
            raise InputError(f"padding_side={padding_side!r}: must be 'right' or 'left'")
        width = max((len(e.ids) for e in encs), default=0)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.full((len(encs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        types = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            row = slice(0, n) if padding_side == "right" else slice(width - n, width)
            ids[i, row] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, row] = 1
            types[i, row] = torch.tensor(e.type_ids, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.type_ids:
            out["token_type_ids"] = types
        return out

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tok.id_to_token(int(i)) for i in ids]


def load_tokenizer(name_or_path, revision=None) -> Tokenizer:
    folder = resolve(name_or_path, revision)
    config = read_json(inside(folder, "tokenizer_config.json")) or {}
    special = read_json(inside(folder, "special_tokens_map.json")) or {}
    for key, value in special.items():
        config.setdefault(key, value)
    model_type = (read_json(inside(folder, "config.json")) or {}).get("model_type", "")
    if (folder / "tokenizer.json").is_file():
        path = inside(folder, "tokenizer.json")
        try:
            tok = _Tokenizer.from_file(str(path))
        except Exception as e:      # the tokenizers library raises its own bare Exception
            raise ConfigError(f"{path}: not a tokenizer file the tokenizers library can read ({e})") from None
    elif (folder / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer
        vocab = inside(folder, "vocab.txt")             # outside the try: a link leaving the folder stays refused
        try:
            tok = BertWordPieceTokenizer(str(vocab), lowercase=config.get("do_lower_case", True))._tokenizer
        except Exception as e:
            raise ConfigError(f"{folder / 'vocab.txt'}: not a WordPiece vocabulary ({e})") from None
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from tokenizers.implementations import ByteLevelBPETokenizer
        vocab, merges = inside(folder, "vocab.json"), inside(folder, "merges.txt")
        try:
            tok = ByteLevelBPETokenizer(str(vocab), str(merges),
                                        add_prefix_space=config.get("add_prefix_space", False))._tokenizer
        except Exception as e:
            raise ConfigError(f"{folder}: vocab.json + merges.txt are not a byte-level BPE vocabulary ({e})") from None
        bos, eos = config.get("bos_token", "<s>"), config.get("eos_token", "</s>")
        bos, eos = (t["content"] if isinstance(t, dict) else t for t in (bos, eos))
        if model_type in ("roberta",):
            tok.post_processor = processors.RobertaProcessing((eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)))
        elif model_type == "opt":   # OPT prepends </s> (its bos) to every text
            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        raise ConfigError(f"{folder}: no tokenizer.json, vocab.txt, or vocab.json + merges.txt")
    if not (folder / "tokenizer.json").is_file():     # the vocab files do not say which tokens are special
        names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        specials = [config[n]["content"] if isinstance(config[n], dict) else config[n] for n in names if config.get(n)]
        tok.add_special_tokens([t for t in specials if tok.token_to_id(t) is not None])
    names = config.get("model_input_names")
    type_ids = "token_type_ids" in names if names else model_type == "bert"
    return Tokenizer(tok, config, folder, type_ids)
