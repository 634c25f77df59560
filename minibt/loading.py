"""Checkpoint -> model: apply a weights map, build on `meta`, fill every parameter exactly once.

Reads only safetensors (mmap'd by the safetensors library), casts once to the target dtype and assigns the
tensors into the model (`load_state_dict(assign=True)`): no random init, no second copy of the weights.
"""
from __future__ import annotations

import json
import mmap
import re
import tomllib
import warnings
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, ConfigError

_LAYER = re.compile(r"\.(\d+)\.")


# ---------------------------------------------------------------------------------------------- weights maps

@lru_cache(maxsize=None)
def weights_map(family: str) -> dict:
    """weights_map/<family>.toml, with `extends` resolved (child entries win)."""
    text = _map_text(family)
    spec = tomllib.loads(text)
    if "extends" in spec:
        base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in weights_map(spec.pop("extends")).items()}
        for key, value in spec.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        spec = base
    return spec


def _map_text(family: str) -> str:
    source_tree = Path(__file__).resolve().parent.parent / "weights_map" / f"{family}.toml"
    if source_tree.is_file():                       # a source checkout
        return source_tree.read_text()
    return resources.files("minibt.weights_map").joinpath(f"{family}.toml").read_text()   # an installed wheel


def map_keys(names, spec: dict):
    """Checkpoint key names -> ({target: [source keys, in concatenation order]}, [unexpected keys])."""
    single, fused = spec.get("keys", {}), {}
    for target, parts in spec.get("fuse", {}).items():
        for i, part in enumerate(parts):
            fused[part] = (target, i, len(parts))
    drop = set(spec.get("drop", []))
    plan, unexpected = {}, []
    for name in names:
        key = name
        for old, new in spec.get("rename", {}).items():
            key = key.replace(old, new)
        candidates = [key] + [key[len(p):] for p in spec.get("prefixes", []) if key.startswith(p)]
        for cand in candidates:
            layer = _LAYER.search(cand)
            template = _LAYER.sub(".{}.", cand, count=1) if layer else cand
            fill = (lambda t: t.replace("{}", layer.group(1))) if layer else (lambda t: t)
            if template in drop:
                break
            if template in single:
                plan.setdefault(fill(single[template]), []).append(name)
                break
            if template in fused:
                target, i, n = fused[template]
                plan.setdefault(fill(target), [None] * n)[i] = name
                break
        else:
            unexpected.append(name)
    return plan, unexpected


# ---------------------------------------------------------------------------------------------- checkpoints

class Checkpoint:
    """The safetensors files of a folder (single or sharded): key -> file, shape, without reading tensors."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(pickle_message(self.folder))
        self.files = [self.folder / f for f in files]
        self.where, self.shapes = {}, {}
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{index}: names shard {path.name}, which is not in {self.folder}")
            with self._open(path) as f:
                for key in f.keys():
                    self.where[key] = path
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    @staticmethod
    def _open(path):
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def read(self, plan: dict, dtype) -> dict:
        """{target: tensor} for {target: [source keys]}: parts concatenated on dim 0, cast to dtype.

        Tensors in the file's dtype are views of a private (copy-on-write) memory map of the file: nothing is
        copied, and pages are read from disk when first used. A cast or a concatenation makes the one copy.
        """
        maps = {path: _MappedFile(path) for path in self.files}
        out = {}
        for target, sources in plan.items():
            parts = [maps[self.where[key]].tensor(key) for key in sources]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            out[target] = t.to(dtype) if t.is_floating_point() else t
            if len(parts) > 1 or out[target] is not parts[0]:
                for key in sources:                      # the copy is what we keep: give the mapped pages back
                    maps[self.where[key]].release(key)
        return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _MappedFile:
    """One safetensors file: 8-byte header length, JSON header, then the raw tensor bytes."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        n = int.from_bytes(self.mm[:8], "little")
        self.header = json.loads(self.mm[8:8 + n])
        self.base = 8 + n

    def tensor(self, key) -> torch.Tensor:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {info['dtype']}, which minibt cannot load")
        dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        flat = torch.frombuffer(self.mm, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self.base + start)
        return flat.view(info["shape"])

    def release(self, key):
        start, end = (self.base + o for o in self.header[key]["data_offsets"])
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE                    # whole pages inside the tensor only
        if end - first >= mmap.PAGESIZE:
            self.mm.madvise(mmap.MADV_DONTNEED, first, (end - first) // mmap.PAGESIZE * mmap.PAGESIZE)


def pickle_message(folder: Path) -> str:
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = f"it holds only {', '.join(pickles)}, a pickle format" if pickles else "no model*.safetensors found"
    return (f"{folder}: no safetensors weights ({found}). minibt never unpickles checkpoints: they can run code. "
            "Get safetensors from the hub (many repos have them on a `refs/pr/N` conversion branch: pass "
            "revision=...), or convert once in a trusted environment with transformers: "
            "`AutoModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)`.")


# ---------------------------------------------------------------------------------------------- config + dtype

def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64}


def pick_dtype(requested, config: dict, device) -> torch.dtype:
    """None: the checkpoint's dtype (`dtype`, or `torch_dtype` in older configs), fp32 if absent."""
    value = requested if requested is not None else config.get("dtype", config.get("torch_dtype")) or "float32"
    if isinstance(value, str):
        if value.removeprefix("torch.") not in _DTYPES:
            raise ConfigError(f"unknown dtype {value!r}; use one of {', '.join(sorted(_DTYPES))}")
        value = _DTYPES[value.removeprefix("torch.")]
    if value == torch.float16 and torch.device(device).type == "cpu":
        warnings.warn("float16 matmuls on CPU are ~1000x slower than bfloat16 here; pass dtype=torch.bfloat16",
                      stacklevel=3)
    return value


# ---------------------------------------------------------------------------------------------- the load

@contextmanager
def empty_model():
    """Build modules on `meta` without running their random init: every value comes from the checkpoint.

    Why patch torch.nn.init: on meta tensors normal_/uniform_ dispatch through torch._refs, whose first use
    imports torch._dynamo (~0.9 s here) to initialise values that are thrown away.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "ones_", "zeros_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint, spec: dict, dtype, device) -> None:
    """Fill every parameter and persistent buffer of a meta-built `model`; one error lists every problem."""
    plan, unexpected = map_keys(checkpoint.where, spec)
    own = dict(model.state_dict(keep_vars=True))
    tied = set(getattr(model, "tied", lambda: {})())
    optional = tuple(f"{m}." for m in spec.get("optional", []))
    problems, missing, misshaped = [], [], []
    for target in list(plan):
        if target in tied or (target not in own and target.startswith(optional)):
            del plan[target]            # tied to another parameter, or a head this model was built without
        elif target not in own:
            unexpected.extend(plan.pop(target))
    for target, param in own.items():
        if target in tied:
            continue
        sources = plan.get(target)
        if sources is None or None in sources:
            missing.append(target if sources is None else
                           f"{target} (fused from {len(sources)} keys, only these present: {[s for s in sources if s]})")
            continue
        shape = _concat_shape([checkpoint.shapes[s] for s in sources])
        if shape != tuple(param.shape):
            misshaped.append(f"{' + '.join(sources)}: checkpoint {shape}, model {tuple(param.shape)}")
    if missing:
        problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if misshaped:
        problems.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped))
    if problems:
        raise CheckpointError(f"{checkpoint.folder}: checkpoint does not match the model built from config.json\n  "
                              + "\n  ".join(problems))
    transpose = model.column_major(dtype) if hasattr(model, "column_major") else set()
    state = {target: (t.t().contiguous().t() if target in transpose else t).to(device)
             for target, t in checkpoint.read(plan, dtype).items()}
    model.load_state_dict(state, strict=False, assign=True)
    for target, source in model.tied().items():
        _set(model, target, _get(model, source))


def _concat_shape(shapes):
    if len(shapes) == 1:
        return tuple(shapes[0])
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _get(model, name):
    mod, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


def _set(model, name, value):
    mod, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod), attr, value)
