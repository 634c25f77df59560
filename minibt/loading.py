"""The one load plan: a hub repo id or folder -> a model on its device, every parameter filled exactly once.

    resolve files (hub.py) -> read config.json -> pick the family -> open the checkpoint (one parser, here): the
    hub's safetensors, whose keys the family's weights map (weights_map/<family>.toml) renames once, or a folder
    written by kernels/quantize.save_quantized, whose keys are already ours -> the map's rules for what a checkpoint
    leaves out (config fields) -> build on `meta` without random init -> swap in quantized modules (a saved
    quantized folder) -> check: nothing missing, unexpected or mis-shaped, in one error -> read the tensors,
    casting once (quantize=: each target layer quantized as soon as its tensors are read) -> assign
    (load_state_dict(assign=True)) -> tie -> swap in the layers quantized at load -> eval, attention backend,
    kernel transforms.

Memory contract: tensor bytes are read from the file into memory the model owns (a concatenation or a cast reads
straight into its result, so no second copy is made). The files are not memory-mapped: once loaded, rewriting,
truncating or deleting a checkpoint file cannot change a live model or crash the process. Pickle checkpoints are
never read.
"""
from __future__ import annotations

import re
import tomllib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from . import kernels
from .config import Fields, loads, read_json
from .errors import CheckpointError, ConfigError, InputError
from .hub import inside, resolve
from .kernels import quantize as quantization
from .kernels.malloc import release_freed_memory
from .models import MODEL_TYPES

_LAYER = re.compile(r"\.(\d+)\.")
HEAD_SUFFIXES = {"ForMaskedLM": "masked-lm", "ForPreTraining": "masked-lm", "ForCausalLM": "causal-lm",
                 "ForSequenceClassification": "sequence-classification"}
REPORT_LIMIT = 30          # problems listed by name per kind in a CheckpointError; the rest are counted


def load(name_or_path, *, attn="auto", dtype=None, device="cpu", revision=None, head="auto", compile=False,
         optimize=True, quantize=None):
    device = check_device(device)
    folder = resolve(name_or_path, revision)
    config_path = inside(folder, "config.json")
    config = read_json(config_path, required=True)
    cls = model_class(config, config_path)
    if quantize == "auto":                    # the fastest path on this CPU that keeps min cosine >= 0.99
        auto_dtype, quantize, _ = quantization.auto_path() if device.type == "cpu" and not cls.causal else (None, None, "")
        dtype = auto_dtype if dtype is None else dtype
    source = open_source(folder, config, cls, head=head, dtype=dtype, device=device, quantize=quantize)
    cfg = cls.config_from_hf(source.config, str(config_path))
    check_layers(cfg.num_layers, source, config_path)          # before building: the build costs per layer
    with skip_init(), torch.device("meta"):
        model = cls(cfg, source.head).to(source.dtype)
        if source.manifest is not None:          # a saved quantized model: its modules, empty, before the check
            quantization.swap_empty(model, source.manifest, source.checkpoint.files[0])
    untie_stored(model, source)
    check_plan(model, source)
    to_quantize = set(quantization.check(model, source.quantize)) if source.quantize else set()
    ready = fill(model, source, device, to_quantize)
    if to_quantize:                           # the layers quantized while reading, and a tied LM head
        quantization.quantize(model, source.quantize, ready=ready)
        release_freed_memory()                # the float matrices and temporaries freed above leave the process
    elif source.manifest is not None:
        model.quantization = {k: source.manifest[k] for k in ("scheme", "modules", "group_sizes")}
    model.source = folder
    model.generation = generation_defaults(folder, config) if cls.causal else {}    # encoders never read it
    model.eval().set_attention(attn)
    return transforms(model, optimize, compile)


def model_class(config: dict, where):
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type={model_type!r} is not supported; minibt has {', '.join(MODEL_TYPES)}")
    cls = MODEL_TYPES[model_type]
    if not cls.causal and Fields(config, str(where)).bool("is_decoder", False):
        raise ConfigError(f"{where}: is_decoder = true asks {model_type} for causal (decoder) attention, which minibt's "
                          f"{model_type} does not implement (it attends both ways); refused rather than computing "
                          "bidirectional attention")
    return cls


def check_layers(num_layers: int, source: "Source", where) -> None:
    """config.json's layer count against the layers the checkpoint holds weights for (`layers.N.` after the weights
    map), before anything is built: a config asking for more layers than the checkpoint has is refused at once."""
    held = {m.group(1) for t in source.plan if (m := re.match(r"layers\.(\d+)\.", t))}
    if num_layers > len(held):
        raise source.error(f"{where}: asks for {num_layers} layers, but the checkpoint in {source.checkpoint.folder} "
                           f"holds weights for {len(held)} (layers.N.* tensors after the weights map); refused before "
                           "building the model")


@dataclass
class Source:
    """What a folder gives the load plan: the checkpoint, its keys mapped to our names, and how to build."""
    checkpoint: "Checkpoint"
    plan: dict                       # our tensor name -> [checkpoint keys, in concatenation order]
    unexpected: list                 # checkpoint keys no parameter takes
    config: dict                     # config.json, with the weights map's rules for what the checkpoint left out
    head: str
    dtype: torch.dtype
    optional: tuple = ()             # parts whose tensors are ignored when the model is built without them
    manifest: dict | None = None     # a folder written by save_quantized: its manifest
    error: type = CheckpointError    # what a mismatch raises (QuantizeError for a saved quantized folder)
    quantize: str | None = None      # a scheme to quantize with while reading (from_hub(quantize=...))


def open_source(folder: Path, config: dict, cls, *, head, dtype, device, quantize) -> Source:
    """The hub layout (safetensors + the family's weights map), or a folder written by save_quantized (its own
    file of our tensor names, with a manifest that must match config.json and what was asked)."""
    saved = quantization.saved_file(folder)
    spec = weights_map(cls.family)
    if saved is not None and full_checkpoint(folder):
        # the rule: a full checkpoint wins, as transformers (which ignores our file) would load this folder
        warnings.warn(f"{folder} holds a full checkpoint and {saved.name}: loading the full checkpoint (as "
                      "transformers would) and ignoring the quantized file; keep a quantized model in a folder of "
                      "its own", stacklevel=4)
        saved = None
    if saved is not None:
        checkpoint = Checkpoint(folder, [saved.name])
        manifest = quantization.read_manifest(checkpoint.metadata, saved)
        quantization.check_saved(manifest, config, cls.family, saved, scheme=quantize,
                                 dtype=None if dtype is None else pick_dtype(dtype, {}, device),
                                 head=None if head == "auto" else head)
        plan, unexpected = quantization.saved_plan(checkpoint.keys(), manifest, saved)
        return Source(checkpoint, plan, unexpected, absent_rules(config, plan, spec), manifest["head"],
                      getattr(torch, manifest["dtype"]), manifest=manifest, error=quantization.QuantizeError)
    if quantize is not None:
        quantization.check_scheme(quantize)
    checkpoint = Checkpoint(folder)
    plan, unexpected = map_keys(checkpoint.keys(), spec)
    return Source(checkpoint, plan, unexpected, absent_rules(config, plan, spec),
                  pick_head(config, head, cls.head_kinds, folder / "config.json"), pick_dtype(dtype, config, device),
                  optional=tuple(f"{m}." for m in spec.get("optional", [])), quantize=quantize)


def absent_rules(config: dict, plan: dict, spec: dict) -> dict:
    """config.json with the weights map's `[absent]` rules applied: a checkpoint without any tensor under a part
    (e.g. BERT's `pooler`, Llama's `lm_head`) sets the config fields the rule names (no pooler; a tied LM head)."""
    out = dict(config)
    for part, fields in spec.get("absent", {}).items():
        if not any(t == part or t.startswith(part + ".") for t in plan):
            out.update(fields)
    return out


def fill(model, source: Source, device, to_quantize: set) -> dict:
    """Read every planned tensor (cast to the model's dtype for it), assign them, tie. Layers in `to_quantize` are
    quantized as soon as their tensors are read; returns them (name -> quantized module) for quantize()."""
    own = model.state_dict(keep_vars=True)
    parts = {}                                # layer to quantize -> its tensors in the plan
    for target in source.plan:
        if target.rpartition(".")[0] in to_quantize:
            parts.setdefault(target.rpartition(".")[0], []).append(target)
    state, ready = {}, {}
    for target, sources in source.plan.items():
        t = source.checkpoint.read(sources, own[target].dtype if own[target].is_floating_point() else None)
        if source.manifest is not None:
            t = quantization.from_saved(model, target, t, source.checkpoint.files[0])
        state[target] = t.to(device)
        layer = target.rpartition(".")[0]
        if layer in parts and all(k in state for k in parts[layer]):
            # quantized as soon as its tensors are read: one float matrix at a time is ever in memory
            ready[layer] = quantization.quantize_weight(source.quantize, state.pop(f"{layer}.weight"),
                                                        state.pop(f"{layer}.bias", None), layer)
    model.load_state_dict(state, strict=False, assign=True)
    for target, tied_to in model.tied().items():
        if target in own:                     # a quantized LM head is its own module (kernels/quantize.py)
            parent, _, attr = target.rpartition(".")
            src_parent, _, src_attr = tied_to.rpartition(".")
            setattr(model.get_submodule(parent), attr, getattr(model.get_submodule(src_parent), src_attr))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and n.rpartition(".")[0] not in to_quantize]
    if left:
        raise CheckpointError(f"{source.checkpoint.folder}: {', '.join(left[:5])} not filled by the checkpoint")
    return ready


def transforms(model, optimize: bool, compile: bool):
    """The kernel transforms from_hub applies last: the default CPU ones, and torch.compile if asked."""
    if optimize:
        kernels.optimize(model)
    if compile:
        from .kernels import compile_mlp
        compile_mlp.apply(model)
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


def check_device(device) -> torch.device:
    """A device torch knows and this machine has (cpu, cuda[:i], mps, ...); an InputError names it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"device={device!r}: not a device torch knows ({str(e).splitlines()[0][:160]})") from None
    if dev.type == "cpu":
        return dev
    module = getattr(torch, dev.type, None)
    available = getattr(module, "is_available", None) if dev.type != "mps" else torch.backends.mps.is_available
    count = getattr(module, "device_count", None)
    if available is None or not available():
        raise InputError(f"device={device!r}: no {dev.type} device on this machine (use 'cpu')")
    if dev.index is not None and count is not None and dev.index >= count():
        raise InputError(f"device={device!r}: this machine has {count()} {dev.type} device(s), numbered from 0")
    return dev


def pick_dtype(requested, config: dict, device) -> torch.dtype:
    """None: the checkpoint's dtype (`dtype`, or `torch_dtype` in older configs), fp32 if absent."""
    value = requested if requested is not None else config.get("dtype", config.get("torch_dtype")) or "float32"
    if isinstance(value, str):
        if value.removeprefix("torch.") not in _DTYPES:
            raise ConfigError(f"unknown dtype {value!r}; use one of {', '.join(sorted(_DTYPES))}")
        value = _DTYPES[value.removeprefix("torch.")]
    if not isinstance(value, torch.dtype) or value not in _DTYPES.values():
        raise ConfigError(f"dtype must be float32, bfloat16, float16 or float64 (or one of {', '.join(sorted(_DTYPES))}),"
                          f" got {value!r}" + ("; float8 weights are not computed in: quantize='int8' or 'int4' "
                                               "makes small weights" if "float8" in str(value) else ""))
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


def untie_stored(model, source: Source) -> None:
    """The rule for a tie the checkpoint contradicts: config.json ties (tie_word_embeddings = true) but the checkpoint
    also stores the tied tensor (e.g. lm_head.weight) with values different from the one it is tied to: the stored
    tensor is used and the model is built untied, with a warning naming the key, as transformers does
    (modeling_utils.tie_weights: both present and not equal -> not tied). Equal values: tied, as before."""
    own = model.state_dict(keep_vars=True)
    for target, tied_to in model.tied().items():
        stored, source_keys = source.plan.get(target), source.plan.get(tied_to)
        if not stored or not source_keys or None in stored or None in source_keys or target not in own:
            continue                  # not stored (the usual tie), or a part check_plan reports
        checkpoint = source.checkpoint
        same = checkpoint.concat_shape(stored) == checkpoint.concat_shape(source_keys) and torch.equal(
            checkpoint.read(stored, own[target].dtype), checkpoint.read(source_keys, own[target].dtype))
        if not same:
            warnings.warn(f"{checkpoint.folder}: config.json has tie_word_embeddings = true, but the checkpoint "
                          f"stores {' + '.join(stored)} with values different from {' + '.join(source_keys)}: using "
                          "the stored tensor, not tied (as transformers does); set tie_word_embeddings = false in "
                          "config.json to silence this", stacklevel=4)
            model.config.tie_word_embeddings = False      # every family's tied() reads this field


def check_plan(model, source: Source) -> None:
    """Every parameter and persistent buffer filled exactly once, with the right shape (and, for integer tensors,
    dtype); one error lists every problem (summarised past REPORT_LIMIT per kind). Drops from the plan what is tied
    or belongs to an absent part."""
    plan, checkpoint = source.plan, source.checkpoint
    own = dict(model.state_dict(keep_vars=True))
    tied = set(model.tied())
    unexpected, missing, misshaped = list(source.unexpected), [], []
    for target in list(plan):
        if target in tied or (target not in own and target.startswith(source.optional)):
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
        if len(sources) != len(set(sources)):
            missing.append(target)
            continue
        shape, dtype = checkpoint.concat_shape(sources), checkpoint.dtype(sources[0])
        if shape != tuple(param.shape):
            misshaped.append(f"{' + '.join(sources)}: checkpoint {shape}, model {tuple(param.shape)}")
        elif param.is_floating_point() != dtype.is_floating_point or (
                not param.is_floating_point() and dtype != param.dtype):      # integer tensors: exactly their dtype
            misshaped.append(f"{' + '.join(sources)}: checkpoint dtype {dtype}, model {param.dtype}")
    problems = []
    for kind, items, sep in (("missing", missing, ", "), ("unexpected", sorted(map(str, unexpected)), ", "),
                             ("mis-shaped", misshaped, "; ")):
        if items:
            shown = sep.join(items[:REPORT_LIMIT])
            more = f"{sep}... and {len(items) - REPORT_LIMIT} more" if len(items) > REPORT_LIMIT else ""
            problems.append(f"{kind} ({len(items)}): {shown}{more}")
    if problems:
        raise source.error(f"{checkpoint.folder}: checkpoint does not match the model built from config.json\n  "
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

    def __init__(self, folder: Path, files: list[str] | None = None):
        """files: read these (a folder written by save_quantized); None: the hub layout, sharded or not. A folder
        holding both model.safetensors and an index loads model.safetensors and ignores the index and its shards, as
        transformers does (modeling_utils._get_resolved_checkpoint_files tries the single file first)."""
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if files is not None:
            weight_map, names = None, files
        elif single_file(self.folder):
            weight_map, names = None, ["model.safetensors"]
        elif index.exists() or index.is_symlink():
            weight_map = read_json(inside(self.folder, index.name), error=CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: not a safetensors index (needs a non-empty 'weight_map' object)")
            names = sorted(set(map(str, weight_map.values())))
        else:
            raise CheckpointError(pickle_message(self.folder))
        self.tensors: dict[str, tuple[Path, dict]] = {}           # key -> (file, header entry)
        self.files, self.metadata = [], {}                        # metadata: the files' `__metadata__`, merged
        for name in names:
            path = inside(self.folder, name, "shard")
            if not path.is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is not in {self.folder}")
            header, metadata = read_header(path, with_metadata=True)
            self.files.append(path)
            self.metadata.update(metadata)
            for key, entry in header.items():
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

    def dtype(self, key) -> torch.dtype:
        return _ST_DTYPES[self.tensors[key][1]["dtype"]]

    def concat_shape(self, keys) -> tuple:
        shapes = [tuple(self.tensors[k][1]["shape"]) for k in keys]
        if len(shapes) == 1:
            return shapes[0]
        if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            return ("parts of different shapes:", *shapes)
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def read(self, keys, dtype=None) -> torch.Tensor:
        """The tensors `keys` concatenated on dim 0, floating point cast to dtype (None: as stored): read straight
        into the result when no cast is needed (one copy of the bytes, in memory the model owns)."""
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
        return out.to(dtype) if dtype is not None and out.is_floating_point() and out.dtype != dtype else out


def single_file(folder: Path) -> bool:
    """Whether the folder holds model.safetensors (a link counts; `inside` then checks where it leads)."""
    path = Path(folder) / "model.safetensors"
    return path.exists() or path.is_symlink()


def full_checkpoint(folder: Path) -> bool:
    """Whether the folder holds a hub-layout checkpoint: model.safetensors or a shard index."""
    return single_file(folder) or (Path(folder) / "model.safetensors.index.json").exists()


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
    header = loads(raw, f"{path}: corrupt safetensors file: its header", error=CheckpointError)
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
        numel, extent = 1, 1
        for d in shape:
            numel, extent = numel * d, extent * max(d, 1)
        if extent >= 2**62:                 # torch cannot make the tensor, even when a size of 0 makes it empty
            bad(f"tensor {key!r}: shape {shape} overflows (sizes multiply to {extent}, over 2**62)")
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
