"""Reading config.json fields with their types and ranges checked, each error naming the file, field and value.

Every family's `Config.from_hf` reads its fields through `Fields`, so a hostile or broken config.json ends in one
`ConfigError` (never an AttributeError or a shape error deep inside torch), and nothing is silently accepted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import ConfigError

REQUIRED = object()


class Fields:
    """Typed access to one config dict; `where` names it in errors (e.g. '/path/config.json')."""

    def __init__(self, config, where: str = "config.json"):
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: must be a JSON object, got {type(config).__name__}")
        self.c, self.where = config, where

    def _get(self, key, default):
        value = self.c.get(key, default)
        if value is REQUIRED:
            raise ConfigError(f"{self.where}: required field {key!r} is missing")
        return value

    def fail(self, key, value, what: str):
        raise ConfigError(f"{self.where}: field {key!r} = {value!r} {what}")

    def int(self, key, default=REQUIRED, *, min: int = 1, none_ok: bool = False):
        value = self._get(key, default)
        if value is None and none_ok:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, value, f"must be an integer >= {min}")
        if value < min:
            self.fail(key, value, f"is out of range: must be in [{min}, inf)")
        return value

    def float(self, key, default=REQUIRED, *, positive: bool = False):
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, value, "must be a finite number")
        if positive and value <= 0:
            self.fail(key, value, "must be > 0")
        return float(value)

    def str(self, key, default=REQUIRED, *, choices=None):
        value = self._get(key, default)
        if not isinstance(value, str):
            self.fail(key, value, "must be a string")
        if choices is not None and value not in choices:
            self.fail(key, value, f"is not supported; minibt has {', '.join(choices)}")
        return value

    def bool(self, key, default=REQUIRED):
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "must be true or false")
        return value

    def dict(self, key):
        value = self.c.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, value, "must be a JSON object")
        return value

    def divides(self, key, by_key, size: int, by: int):
        """size % by == 0, e.g. hidden_size by num_attention_heads."""
        if size % by:
            raise ConfigError(f"{self.where}: {key} = {size} is not divisible by {by_key} = {by}")

    def labels(self) -> int:
        """Number of classification labels: id2label when present, else num_labels (default 2)."""
        id2label = self.dict("id2label")
        return len(id2label) if id2label else self.int("num_labels", 2)


MAX_JSON_BYTES = 100 << 20    # the largest JSON file or safetensors header minibt reads (safetensors' own limit)
MAX_JSON_DEPTH = 64           # nesting levels of arrays/objects; real model files use under 10


def loads(raw: bytes | str, where, *, error=ConfigError, kind=dict):
    """The one JSON parser: `raw` (at most MAX_JSON_BYTES, nested at most MAX_JSON_DEPTH deep) must hold a `kind`
    (object, list, or None for any value). Every fault is `error` naming `where` and the limit."""
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{where}: {len(raw)} bytes of JSON, over the {MAX_JSON_BYTES}-byte limit")
    try:
        value = json.loads(raw)
    except RecursionError:
        value = None                                # deeper than Python's parser goes: reported as too deep below
        depth = MAX_JSON_DEPTH + 1
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    else:
        depth = _depth(value)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{where}: JSON nested deeper than the limit of {MAX_JSON_DEPTH} levels")
    if kind is not None and not isinstance(value, kind):
        raise error(f"{where}: must hold a JSON {'object' if kind is dict else kind.__name__}, "
                    f"got {type(value).__name__}")
    return value


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a scalar is 0, [] or {} is 1)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                break
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_json(path, *, error=ConfigError, required: bool = False, kind=dict):
    """A JSON file that must hold an object (or `kind`); None when absent and not required. A FIFO, a device or a
    folder in its place is refused (never opened), and the file is read and parsed within `loads`' limits. Every
    fault is `error` naming the file."""
    path = Path(path)
    if not path.exists():
        if required:
            raise error(f"{path.parent}: no {path.name}")
        return None
    if not path.is_file():
        raise error(f"{path}: not a regular file; refused")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    return loads(raw, path, error=error, kind=kind)
