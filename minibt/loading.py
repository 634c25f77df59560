"""The one load plan: a hub repo id or folder -> a model on its device, every parameter filled exactly once.

    resolve files (hub.py) -> read config.json -> pick the family and head -> read every safetensors header (one
    parser, here) -> map checkpoint keys to parameter names once (weights_map/<family>.toml) -> build on `meta`
    without random init -> check: nothing missing, unexpected or mis-shaped, in one error -> read the tensors,
    casting once (quantize=: each target layer quantized as soon as its tensors are read) -> assign
    (load_state_dict(assign=True)) -> tie -> swap in the quantized layers -> eval, attention backend,
    kernel transforms. A folder written by kernels/quantize.save_quantized takes that module's load_quantized.

Memory contract: tensor bytes are read from the file into memory the model owns (a concatenation or a cast reads
straight into its result, so no second copy is made). The files are not memory-mapped: once loaded, rewriting,
truncating or deleting a checkpoint file cannot change a live model or crash the process. Pickle checkpoints are
never read.
"""
from __future__ import annotations

import json
import re
import tomllib
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from . import kernels
from .kernels.malloc import release_freed_memory
from .config import Fields, read_json
from .errors import CheckpointError, ConfigError
from .hub import inside, resolve

_LAYER = re.compile(r"\.(\d+)\.")
HEAD_SUFFIXES = {"ForMaskedLM": "masked-lm", "ForPreTraining": "masked-lm", "ForCausalLM": "causal-lm",
                 "ForSequenceClassification": "sequence-classification"}
REPORT_LIMIT = 30          # problems listed by name per kind in a CheckpointError; the rest are counted


def load(name_or_path, *, attn="auto", dtype=None, device="cpu", revision=None, head="auto", compile=False,
         optimize=True, quantize=None):
    from .kernels import quantize as quantization
    from .models import MODEL_TYPES
    folder = resolve(name_or_path, revision)
    if (folder / quantization.QUANTIZED_FILE).is_file():        # written by save_quantized: its own small plan
        model = quantization.load_quantized(folder, attn=attn, device=device, expect=quantize,
                                            dtype=None if dtype is None else pick_dtype(dtype, {}, device),
                                            head=None if head == "auto" else head)
        return transforms(model, optimize, compile)
    config_path = inside(folder, "config.json")
    config = read_json(config_path, required=True)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{config_path}: model_type={model_type!r} is not supported; minibt has "
                          f"{', '.join(MODEL_TYPES)}")
    cls = MODEL_TYPES[model_type]
    head = pick_head(config, head, cls.head_kinds, config_path)
    dtype = pick_dtype(dtype, config, device)
    checkpoint = Checkpoint(folder)
    spec = weights_map(cls.family)
    plan, unexpected = map_keys(checkpoint.keys(), spec)
    with skip_init(), torch.device("meta"):
        model = cls.from_hf(config, head, set(plan), str(config_path))
    check_plan(model, plan, unexpected, checkpoint, spec)
    layers = set(quantization.check(model, quantize)) if quantize is not None else set()
    params = {}                               # layer to quantize -> its tensors in the plan
    for target in plan:
        if target.rpartition(".")[0] in layers:
            params.setdefault(target.rpartition(".")[0], []).append(target)
    state, ready = {}, {}
    for target, sources in plan.items():
        state[target] = checkpoint.read(sources, dtype).to(device)
        layer = target.rpartition(".")[0]
        if layer in params and all(k in state for k in params[layer]):
            # quantized as soon as its tensors are read: one float matrix at a time is ever in memory
            ready[layer] = quantization.quantize_weight(quantize, state.pop(f"{layer}.weight"),
                                                        state.pop(f"{layer}.bias", None), layer)
    model.load_state_dict(state, strict=False, assign=True)
    for target, source in model.tied().items():
        parent, _, attr = target.rpartition(".")
        src_parent, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(parent), attr, getattr(model.get_submodule(src_parent), src_attr))
    model.source = folder
    model.generation = generation_defaults(folder, config) if cls.causal else {}    # encoders never read it
    if quantize is not None:                  # the layers quantized above, and a tied LM head from the embedding
        quantization.quantize(model, quantize, ready=ready)
        release_freed_memory()                # the float matrices and temporaries freed above leave the process
    model.eval().set_attention(attn)
    return transforms(model, optimize, compile)


def transforms(model, optimize: bool, compile: bool):
    """The kernel transforms from_hub applies last: the default CPU ones, and torch.compile if asked."""
    if optimize:
        kernels.optimize(model)
    if compile:
        from .kernels import compile as compile_transform
        compile_transform.apply(model)
    return model


def pick_head(config: dict, head: str, available, where) -> str:
    if head == "auto":
        archs = config.get("architectures") or [""]
        arch = archs[0] if isinstance(archs, list) and isinstance(archs[0], str) else ""
        head = next((h for suffix, h in HEAD_SUFFIXES.items() if arch.endswith(suffix)), "base")
        return head if head in available else "base"
    if head not in available:
        raise ConfigError(f"head={head!r} is not available for model_type={config.get('model_type')!r} ({where}); "
                          f"choose from {', '.join(available)}")
    return head


def generation_defaults(folder: Path, config: dict) -> dict:
    """eos/pad/bos token ids for generate(): config.json, overridden by generation_config.json when present."""
    out = {}
    for source, where in ((config, "config.json"),
                          (read_json(inside(folder, "generation_config.json")) or {}, "generation_config.json")):
        f = Fields(source, str(folder / where))
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = source.get(key)
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                f.fail(key, value, "must be a token id (integer >= 0) or a list of them")
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- dtype

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
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch dtype or one of {', '.join(sorted(_DTYPES))}, "
                          f"got {value!r}")
    if value == torch.float16 and torch.device(device).type == "cpu":
        warnings.warn("float16 matmuls on CPU are ~1000x slower than bfloat16 here; use bfloat16",
                      stacklevel=3)
    return value


# ---------------------------------------------------------------------------------------------- weights maps

@lru_cache(maxsize=None)
def weights_map(family: str) -> dict:
    """weights_map/<family>.toml, with `extends` resolved (child entries win)."""
    spec = tomllib.loads(_map_text(family))
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


def check_plan(model, plan: dict, unexpected: list, checkpoint: "Checkpoint", spec: dict) -> None:
    """Every parameter and persistent buffer filled exactly once, with the right shape; one error lists every
    problem (summarised past REPORT_LIMIT per kind). Drops from `plan` what is tied or belongs to an absent head."""
    own = dict(model.state_dict(keep_vars=True))
    tied = set(model.tied())
    optional = tuple(f"{m}." for m in spec.get("optional", []))
    missing, misshaped = [], []
    for target in list(plan):
        if target in tied or (target not in own and target.startswith(optional)):
            del plan[target]            # tied to another parameter, or a head this model was built without
        elif target not in own:
            unexpected.extend(s for s in plan.pop(target) if s is not None)
    for target, param in own.items():
        if target in tied:
            continue
        sources = plan.get(target)
        if sources is None or None in sources:
            missing.append(target if sources is None else
                           f"{target} (fused from {len(sources)} keys, only these present: {[s for s in sources if s]})")
            continue
        if len(sources) != len(set(sources)) or any(s is None for s in sources):
            missing.append(target)
            continue
        shape = checkpoint.concat_shape(sources)
        if shape != tuple(param.shape):
            misshaped.append(f"{' + '.join(sources)}: checkpoint {shape}, model {tuple(param.shape)}")
    problems = []
    for kind, items, sep in (("missing", missing, ", "), ("unexpected", sorted(map(str, unexpected)), ", "),
                             ("mis-shaped", misshaped, "; ")):
        if items:
            shown = sep.join(items[:REPORT_LIMIT])
            more = f"{sep}... and {len(items) - REPORT_LIMIT} more" if len(items) > REPORT_LIMIT else ""
            problems.append(f"{kind} ({len(items)}): {shown}{more}")
    if problems:
        raise CheckpointError(f"{checkpoint.folder}: checkpoint does not match the model built from config.json\n  "
                              + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------- building

class skip_init(TorchFunctionMode):
    """Build modules without running their random init: every value comes from the checkpoint.

    A torch-function mode, so it is local to the calling thread and ends with the `with` block: modules built at
    the same time in other threads are initialised as usual. (On meta tensors the init functions would also import
    torch._dynamo, ~0.9 s, to initialise values that are thrown away.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
MAX_HEADER = 100 << 20     # safetensors' own limit on the JSON header


class Checkpoint:
    """The safetensors files of a model folder (single or sharded), read by one parser: this class.

    Opening reads and checks every header (tensor names, dtypes, shapes, byte ranges inside the file, no overlap,
    each tensor in exactly one shard, shards named by the index inside the folder); `read` reads tensor bytes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(inside(self.folder, index.name), error=CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: not a safetensors index (needs a non-empty 'weight_map' object)")
            names = sorted(set(map(str, weight_map.values())))
        elif (self.folder / "model.safetensors").is_file():
            weight_map, names = None, ["model.safetensors"]
        else:
            raise CheckpointError(pickle_message(self.folder))
        self.tensors: dict[str, tuple[Path, dict]] = {}           # key -> (file, header entry)
        for name in names:
            path = inside(self.folder, name, "shard")
            if not path.is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is not in {self.folder}")
            for key, entry in read_header(path).items():
                if key in self.tensors:
                    raise CheckpointError(f"{self.folder}: tensor {key!r} is in two shards, "
                                          f"{self.tensors[key][0].name} and {path.name}")
                self.tensors[key] = (path, entry)
        if weight_map is not None:
            for key, shard in weight_map.items():
                if key in self.tensors and self.tensors[key][0].name != Path(str(shard)).name:
                    raise CheckpointError(f"{index}: says {key!r} is in {shard}, but it is in "
                                          f"{self.tensors[key][0].name}")

    def keys(self):
        return list(self.tensors)

    def concat_shape(self, keys) -> tuple:
        shapes = [tuple(self.tensors[k][1]["shape"]) for k in keys]
        if len(shapes) == 1:
            return shapes[0]
        if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            return ("parts of different shapes:", *shapes)
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def read(self, keys, dtype) -> torch.Tensor:
        """The tensors `keys` concatenated on dim 0, floating point cast to dtype: read straight into the result
        when no cast is needed (one copy of the bytes, in memory the model owns)."""
        entries = [self.tensors[k] for k in keys]
        stored = _ST_DTYPES[entries[0][1]["dtype"]]
        if any(_ST_DTYPES[e["dtype"]] != stored for _, e in entries):
            raise CheckpointError(f"{self.folder}: {' + '.join(keys)} mix dtypes and cannot be concatenated")
        out = torch.empty(self.concat_shape(keys), dtype=stored)
        row = 0
        for key, (path, e) in zip(keys, entries):
            n = e["shape"][0] if e["shape"] else 1
            part = out[row:row + n] if out.dim() else out
            _read_into(path, e, part, key)
            row += n
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out


def read_header(path: Path, with_metadata: bool = False):
    """{key: {dtype, shape, data_offsets (absolute in the file)}}, checked; a CheckpointError names the fault.
    with_metadata: also the file's `__metadata__` ({} when absent)."""
    def bad(what):
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({what})")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                bad("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                bad(f"header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        bad(f"header is not JSON: {e}")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        bad("__metadata__ must map names to strings")
    base, spans, out = 8 + n, [], {}
    for key, e in header.items():
        if not isinstance(e, dict) or e.get("dtype") not in _ST_DTYPES:
            if isinstance(e, dict) and isinstance(e.get("dtype"), str):
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {e['dtype']}, which minibt cannot load")
            bad(f"tensor {key!r}: entry needs a dtype among {', '.join(_ST_DTYPES)}")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape):
            bad(f"tensor {key!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            bad(f"tensor {key!r}: data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _ST_DTYPES[e["dtype"]].itemsize:
            bad(f"tensor {key!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {e['dtype']}")
        if base + offsets[1] > size:
            bad(f"tensor {key!r} ends at byte {base + offsets[1]}, past the end of the file ({size} bytes)")
        spans.append((offsets[0], offsets[1], key))
        out[key] = {"dtype": e["dtype"], "shape": shape, "data_offsets": [base + offsets[0], base + offsets[1]]}
    spans.sort()
    for (s1, e1, k1), (s2, e2, k2) in zip(spans, spans[1:]):
        if s2 < e1 and s2 < e2:
            bad(f"tensors {k1!r} and {k2!r} overlap")
    if with_metadata:
        return out, metadata or {}
    return out


def read_file(path: Path) -> tuple[dict, dict]:
    """Every tensor of one safetensors file (in memory it owns) and its string metadata, through the same parser."""
    entries, metadata = read_header(path, with_metadata=True)
    tensors = {}
    for key, e in entries.items():
        tensors[key] = torch.empty(e["shape"], dtype=_ST_DTYPES[e["dtype"]])
        _read_into(path, e, tensors[key], key)
    return tensors, metadata


def _read_into(path: Path, entry: dict, out: torch.Tensor, key: str) -> None:
    start, end = entry["data_offsets"]
    if end == start:
        return
    buffer = out.view(-1).view(torch.uint8).numpy()
    try:
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(buffer)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e.strerror})") from None
    if got != end - start:
        raise CheckpointError(f"{path}: tensor {key!r} is truncated ({got} of {end - start} bytes; the file changed "
                              "while it was read?)")


def pickle_message(folder: Path) -> str:
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = f"it holds only {', '.join(pickles)}, a pickle format" if pickles else "no model*.safetensors found"
    return (f"{folder}: no safetensors weights ({found}). minibt never unpickles checkpoints: they can run code. "
            "Get safetensors from the hub (many repos have them on a `refs/pr/N` conversion branch: pass "
            "revision=...), or convert once in a trusted environment with transformers: "
            "`AutoModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)`.")
