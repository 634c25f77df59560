"""Quantized linear layers: int8 (per-output-channel) and int4 (group-wise) weights, applied after loading.

`quantize(model, "int8" | "int4")` swaps every linear layer of the transformer layers and the LM head / MLM
decoder for a quantized module holding only integer weights and scales; embeddings, norms, the pooler and
classifier, and the attention itself stay in the model's dtype. A tied LM head gets its own int8/int4 copy: the
embedding it is tied to is never quantized.

Schemes (x is the input, W the float weight of shape (out, in)):
- int8: W[n] ~ q[n] * s[n], s[n] = max|W[n]| / 127, q in [-127, 127]. Error per weight <= s[n] / 2.
- int4: per group of G inputs, W ~ (q - 8) * scale + zero with q in [0, 15], asymmetric (min..max of the group,
  scale and zero rounded to bf16 first, q chosen for the rounded values). Error per weight <= scale / 2 (+ the bf16
  rounding of zero). G = 32 by default (llama.cpp's Q4 block): on SmolLM2-135M, perplexity rose 7.4% with G=32
  and 78% with G=64. Rule for another `group_size`: a layer whose in_features it does not divide takes the largest
  smaller size of GROUP_SIZES that does; none does: QuantizeError naming the layer and its width.

Routes, picked by measurement on this CPU (torch 2.13, 2 threads, AVX512-VNNI/AMX; numbers in README "Quantized
inference"). Every route computes with bf16 activations and returns x's dtype:
- int8, up to GEMV_ROWS rows (decode steps): `torch._weight_int8pack_mm` with bf16 activations. Its fp32-activation
  variant was 3-6x slower here; plain fp32 / bf16 linears read 4x / 2x the bytes.
- int8, more rows (encoder batches, prefill): dequantize to bf16 (int8 -> bf16 is exact, times the scale) and one
  bf16 GEMM (AMX). Measured alternatives: dynamic per-token int8 activations via `torch._int_mm` (3-4x slower than
  this: torch._int_mm does not reach the int8 units here), via oneDNN's `onednn.qlinear_pointwise` (its int8 GEMM
  alone was 2.7x faster than a bf16 one, but quantizing the activations per token in eager ops cost more than
  that saved), and fbgemm's `quantized.linear_dynamic` (fast, but per-tensor activation scales: all-MiniLM-L6-v2
  embeddings fell to a min cosine of 0.934 against fp32 on 600 real texts; this route gives 0.999).
- int4, any number of rows: `torch._weight_int4pack_mm_for_cpu` with bf16 activations (fp32: ~15x slower).
- int8, one row inside a compiled decode step: decode_linear.one_row, inductor's vectorized reduction over the int8
  rows (6.6 vs 15.6 ms for SmolLM2-135M's linears; inductor's own int8 GEMM template measured 17 ms here).
No full-precision copy of a quantized weight is kept: `from_hub(..., quantize=)` quantizes each layer as soon as its
tensors are read (`check` first, then `quantize_weight`), so at most one float matrix is in memory at a time
(plus the float embedding, which stays float).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MinibtError
from .decode_linear import one_row

SCHEMES = ("int8", "int4", "w8a8")
CHOICES = SCHEMES + ("auto",)            # "auto": auto_path(), encoders on the CPU
GROUP_SIZES = (256, 128, 64, 32)          # int4 group sizes the kernel takes
GEMV_ROWS = 16                            # int8: up to this many rows, the weight-only integer kernel
CHUNK_ROWS = 4096                         # rows quantized at a time (a multiple of the int4 packing's 64-row blocks)


class QuantizeError(MinibtError):
    """A layer or a scheme that quantization does not support, or a quantized file that does not match."""


def int4_group_size(in_features: int, where: str = "", group_size: int = 32) -> int:
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group_size={group_size}: choose from {', '.join(map(str, GROUP_SIZES))}")
    for g in GROUP_SIZES:
        if g <= group_size and in_features % g == 0:
            return g
    raise QuantizeError(f"int4: layer {where or '?'} has in_features={in_features}, which no supported group size "
                        f"({', '.join(map(str, GROUP_SIZES))}) divides; quantize this model with 'int8' instead")


class QuantLinear(nn.Module):
    """Shared shape handling; subclasses hold the integer weight and implement mm (below) and dequantize()."""

    scheme = "?"

    def __init__(self, in_features: int, out_features: int, bias):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # mm(x: (rows, in) bf16, contiguous, 64-byte aligned; bias: bf16 (out,) or None) -> (rows, out) bf16

    def forward(self, x):
        if x.dtype == torch.float64:                # the audit's exact reference: the same integer weights in fp64
            return F.linear(x, self.dequantize(torch.float64), self.bias)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)              # a fresh tensor: contiguous and aligned
        elif torch.compiler.is_compiling() or x2.data_ptr() % 64 or not x2.is_contiguous():
            # the integer kernels want aligned rows; a compiled step cannot read an address (its buffers are
            # inductor's own, aligned: the copy is then a fresh buffer or folded away)
            x2 = x2.clone(memory_format=torch.contiguous_format)
        same = self.bias is not None and self.bias.dtype == torch.bfloat16
        y = self.mm(x2, self.bias if same else None)               # (rows, out) bf16
        if self.bias is not None and not same:
            y = torch.add(self.bias, y)             # one pass: the bias added in x's dtype, the cast included
        if y.dtype != x.dtype:                      # (fp16: bias + bf16 promotes to fp32)
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self):
        """The dequantized weight, made on each access (transient): for code that needs a float weight, e.g. the
        fused encoder kernel. Nothing keeps it."""
        return self.dequantize(self.bias.dtype if self.bias is not None else torch.float32)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    scheme = "int8"

    def __init__(self, in_features, out_features, bias=None):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.register_buffer("scale_bf16", torch.empty(out_features, dtype=torch.bfloat16), persistent=False)
        # the kernel's bf16 copy of `scale` is not saved: remade whenever a state dict is loaded
        self.register_load_state_dict_post_hook(lambda mod, _: setattr(mod, "scale_bf16", mod.scale.to(torch.bfloat16)))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None) -> "Int8Linear":
        n, k = weight.shape
        mod = cls(k, n, bias)
        mod.qweight, mod.scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
        for i in range(0, n, CHUNK_ROWS):                    # a few MB of float temporaries at a time
            w = weight[i:i + CHUNK_ROWS].detach().float()
            mod.scale[i:i + CHUNK_ROWS] = scale = w.abs().amax(1).clamp(min=1e-12) / 127
            mod.qweight[i:i + CHUNK_ROWS] = torch.div(w, scale[:, None]).round_().clamp_(-127, 127)
        mod.scale_bf16 = mod.scale.to(torch.bfloat16)
        return mod

    def dequantize(self, dtype=torch.float32):
        return (self.qweight.to(self.scale.dtype) * self.scale[:, None]).to(dtype)

    def mm(self, x, bias=None):
        if x.shape[0] == 1 and x.is_cpu and torch.compiler.is_compiling():   # a compiled decode step (decode_linear)
            return one_row(x, self.qweight, bias, self.scale_bf16)
        if x.shape[0] <= GEMV_ROWS and self.in_features % 16 == 0:   # other widths: wrong sums or a crash
            y = torch._weight_int8pack_mm(x, self.qweight, self.scale_bf16.to(torch.bfloat16))
            return y if bias is None else y.add_(bias)
        # a transient bf16 weight (int8 -> bf16 is exact), not kept
        w = self.qweight.to(torch.bfloat16).mul_(self.scale_bf16.to(torch.bfloat16)[:, None])
        return F.linear(x, w, bias)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere): picks w8a8's activation range here and the
    embedding path in kernels/pick.py."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def activation_levels() -> int:
    """w8a8's activation codes per sign: 127 where the CPU multiplies u8 x s8 into int32 directly (VNNI, AMX), 63
    elsewhere. Without VNNI, oneDNN's int8 GEMM adds pairs of u8 x s8 products in int16, which saturate above
    32767; with codes in 1..255 a pair reaches 2 x 255 x 127 = 64770, with 65..191 it stays below (fbgemm's
    reduce_range, the same cause)."""
    return 127 if cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"} else 63


# quantize="auto" for an encoder on the CPU: the fastest path measured on each kind of CPU that keeps the
# embeddings' min cosine to fp32 >= 0.99 (all-MiniLM-L6-v2, real texts; benchmarks/embed_corpus.py, docs/benchmarks.md).
# (flags any of which the CPU has, dtype, scheme, why)
AUTO_PATHS = (
    ({"amx_bf16"}, torch.bfloat16, None,
     "AMX: bf16 GEMMs on the AMX tiles, the fastest measured there (3.4x fp32; int8 weights 0.9x bf16); min cosine 0.9999"),
    ({"avx512_bf16"}, torch.bfloat16, None,
     "AVX-512 bf16 without AMX (AMD Zen 4): bf16 2.0x fp32, min cosine 0.9999; w8a8 was faster still (2.7x fp32) but "
     "its min cosine, 0.990, is under the bar"),
    (set(), None, None, "no bf16 or AMX units: fp32 (bf16 is emulated there; w8a8 not measured on such a CPU)"),
)


def auto_path(flags: set | None = None) -> tuple:
    """(dtype or None for the checkpoint's, scheme or None, why) that quantize="auto" picks on this CPU."""
    flags = cpu_flags() if flags is None else flags
    return next((dtype, scheme, why) for need, dtype, scheme, why in AUTO_PATHS if not need or flags & need)


class W8A8Linear(Int8Linear):
    """int8 weights as Int8Linear, and int8 activations: each row of x is quantized at run time to
    qx = round(x / sx) with sx = max|x_row| / L (L = 127, or 63 on CPUs without VNNI: `activation_levels`;
    symmetric, per row: one outlier token does not coarsen the others, as a per-tensor scale would), then
    y = (qx @ q.T) * sx * s + bias with the sums in int32. This textbook form runs in float64 (the audit's
    reference: `mm_reference`). The kernel is oneDNN's int8 GEMM (VNNI / AMX int8 units): it is handed qx + 128
    as uint8 with zero point 128 and scale 1 (its signed-activation path is a slow reference loop, measured
    ~5000x slower here) and the weight scales per channel; the row scales are applied to its fp32 output.
    Attention, norms and activations stay in float."""
    scheme = "w8a8"
    levels = activation_levels()

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        # max|x| per row from max and -min: two reads, no |x| temporary (measured: 3x less time than abs + amax)
        sx = torch.maximum(x2.amax(1, keepdim=True), x2.amin(1, keepdim=True).neg_()).float()
        sx = sx.clamp_(min=1e-12).div_(self.levels)
        if x.dtype == torch.float64:
            return self.mm_reference(x2, sx).view(*x.shape[:-1], self.out_features)
        # round(x / sx) + 128 as uint8: cast to int8 (fast here; a float -> uint8 cast is 5x slower), then flip the
        # sign bit, which adds 128 to the two's-complement byte
        qx = torch.mul(x2, sx.reciprocal()).round_().to(torch.int8).view(torch.uint8).bitwise_xor_(128)
        y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, self.packed(), self.scale, self.zeros(), None, 1.0, 0,
                                               torch.float32, "none", [None], "")
        y = y.mul_(sx) if self.bias is None else torch.addcmul(self.bias, y, sx)   # scale and bias in one pass
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def mm_reference(self, x, sx):
        """The plain form in float64: the same integer codes, exact sums."""
        qx = torch.round(x.double() / sx.double())
        y = (qx @ self.qweight.double().T) * sx.double() * self.scale.double()
        return y if self.bias is None else y + self.bias.double()

    def packed(self):
        """oneDNN's prepacked copy of qweight, made on first use and kept (int8, the size of qweight)."""
        if self.qweight.device.type != "cpu":
            raise QuantizeError(f"w8a8 runs on the CPU (oneDNN's int8 GEMM); this layer is on {self.qweight.device}: "
                                "use quantize='int8' there")
        key = (self.qweight.data_ptr(), self.qweight._version)
        if getattr(self, "_packed", (None, None))[0] != key:
            self._packed = key, torch.ops.onednn.qlinear_prepack(self.qweight, None)
        return self._packed[1]

    def zeros(self):
        if getattr(self, "_zeros", None) is None or self._zeros.numel() != self.out_features:
            self._zeros = torch.zeros(self.out_features, dtype=torch.int64)
        return self._zeros


class Int4Linear(QuantLinear):
    scheme = "int4"

    def __init__(self, in_features, out_features, bias=None, group_size: int = 32):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        rows = -(-out_features // 16) * 16      # the packing needs a multiple of 16 outputs: zero rows pad it
        # the layout of torch._convert_weight_to_int4pack_for_cpu: (rows, in / 2) bytes, two 4-bit values each
        self.register_buffer("packed", torch.empty(rows, in_features // 2, dtype=torch.uint8))
        # (in / G, rows, 2): scale and zero of each group, the kernel's own layout
        self.register_buffer("scale_zero", torch.empty(in_features // group_size, rows, 2, dtype=torch.bfloat16))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None, where: str = "", group_size: int = 32) -> "Int4Linear":
        n, k = weight.shape
        g = int4_group_size(k, where, group_size)
        mod = cls(k, n, bias, g)
        rows = mod.packed.shape[0]
        scale, zero = torch.empty(rows, k // g), torch.empty(rows, k // g)
        for i in range(0, rows, CHUNK_ROWS):                 # the packing is row-local in blocks of 64 rows
            end = min(i + CHUNK_ROWS, rows)
            w = weight[i:end].detach().float()
            w = F.pad(w, (0, 0, 0, end - i - w.shape[0])).view(-1, k // g, g)      # zero rows pad to `rows`
            lo, hi = w.amin(-1), w.amax(-1)
            scale[i:end] = s = ((hi - lo).clamp(min=1e-12) / 15).to(torch.bfloat16).float()
            zero[i:end] = z = (lo + 8 * s).to(torch.bfloat16).float()          # w = (q - 8) * scale + zero
            q = torch.round((w - z[..., None]) / s[..., None] + 8).clamp(0, 15).to(torch.int32).view(-1, k)
            mod.packed[i:end] = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        mod.scale_zero = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
        return mod

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}"

    def codes(self) -> torch.Tensor:
        """(rows, in) int32 values 0..15, undoing the kernel's packing (a nibble permutation, see _int4_layout)."""
        n, k = self.packed.shape[0], self.in_features
        nibbles = torch.stack([self.packed & 15, self.packed >> 4], -1).flatten()
        out = torch.empty(n * k, dtype=torch.int32)
        out[_int4_layout(n, k)] = nibbles.to(torch.int32)
        return out.view(n, k)

    def dequantize(self, dtype=torch.float32):
        n, k, g = self.out_features, self.in_features, self.group_size
        sz = self.scale_zero.transpose(0, 1).to(torch.promote_types(dtype, torch.float32))  # (rows, in / G, 2)
        q = self.codes().to(sz.dtype).view(-1, k // g, g)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(-1, k)[:n].to(dtype)

    def mm(self, x, bias=None):
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size,
                                              self.scale_zero.to(torch.bfloat16))
        y = y if y.shape[1] == self.out_features else y[:, :self.out_features]
        return y if bias is None else y + bias


def _int4_layout(n: int, k: int) -> torch.Tensor:
    """For each nibble of the packed tensor (low then high, row-major), the flat (out, in) index it holds.
    Found by packing the index itself, 4 bits at a time: torch's CPU layout is a permutation and not documented."""
    idx = torch.arange(n * k, dtype=torch.int64).view(n, k)
    src = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        p = torch._convert_weight_to_int4pack_for_cpu(((idx >> shift) & 15).to(torch.int32), 1)
        src |= torch.stack([p & 15, p >> 4], -1).flatten().to(torch.int64) << shift
    return src


# ---------------------------------------------------------------------------------------------- the transform

def targets(model) -> list[str]:
    """Names of the linear layers a quantization replaces: every nn.Linear under `layers`, and the LM head or MLM
    decoder (+ its dense transform). Pooler, classifier and OPT's embedding projections stay in float: they are
    small, and a classifier's few outputs are the most sensitive to rounding."""
    heads = {"lm_head", "mlm.dense", "mlm.decoder"}
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and (name.startswith("layers.") or name in heads)]


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise QuantizeError(f"quantize={scheme!r} is not a scheme minibt has; choose from {', '.join(SCHEMES)}")


def check(model, scheme: str, group_size: int = 32) -> list[str]:
    """The names `quantize` would replace; QuantizeError if the scheme is unknown or one layer cannot take it.
    Reads only shapes, so the loader asks before reading any weight."""
    check_scheme(scheme)
    if getattr(model, "quantization", None):
        raise QuantizeError(f"this model is already quantized ({model.quantization['scheme']})")
    experts = next((n for n, p in model.named_parameters() if p.dim() == 3), None)
    if experts is not None:
        raise QuantizeError(f"{model.family}: {experts} is a stack of expert weights, which the int8/int4 linears do "
                            "not cover; refused rather than quantizing only the rest of the model")
    names = targets(model)
    if scheme == "int4":
        for name in names:
            int4_group_size(model.get_submodule(name).in_features, name, group_size)
    return names


def quantize_weight(scheme: str, weight: torch.Tensor, bias=None, where: str = "", group_size: int = 32):
    """One layer's float weight (out, in) and bias -> its Int8Linear / Int4Linear."""
    if scheme in ("int8", "w8a8"):
        return (Int8Linear if scheme == "int8" else W8A8Linear).from_weight(weight, bias)
    return Int4Linear.from_weight(weight, bias, where, group_size)


def quantize(model, scheme: str, group_size: int = 32, ready: dict | None = None):
    """Replace the target linear layers (see `targets`) by Int8Linear / Int4Linear, in place; returns the model.
    group_size: int4 only (see the module docstring for the rule). Refuses (QuantizeError) before changing
    anything if one layer cannot take the scheme. ready: layers the loader already quantized while reading the
    checkpoint (name -> module), so that only one float matrix at a time was ever in memory."""
    names = check(model, scheme, group_size)
    ready = dict(ready or {})
    for name in names:
        new = ready.pop(name, None)
        if new is None:
            old = model.get_submodule(name)
            new = quantize_weight(scheme, old.weight, old.bias, name, group_size)
            del old                                       # its float weight is freed (a tied one is the embedding's)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.quantization = {"scheme": scheme, "modules": names,
                          "group_sizes": {n: m.group_size for n, m in model.named_modules() if isinstance(m, Int4Linear)}}
    return model


# ---------------------------------------------------------------------------------------------- save / load

QUANTIZED_FILE = "minibt-quantized.safetensors"
FORMAT, VERSION = "minibt-quantized", 1


def config_hash(config: dict) -> str:
    import hashlib
    import json
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def save_quantized(model, folder):
    """Write a quantized model as `folder/minibt-quantized.safetensors` (float tensors, integer weights, scales;
    a JSON manifest in the safetensors metadata) beside a copy of its config.json and tokenizer files.
    `minibt.from_hub(folder)` loads it back bit-identically. int4 weights are stored in a layout of our own:
    (out, in / 2) bytes, input column 2j in the low 4 bits and 2j + 1 in the high 4 bits.

    The folder must be new, empty, or a folder save_quantized wrote for the same config.json (overwritten):
    anything else (another model's folder, a full checkpoint) is refused before anything is written. Each file is
    written atomically (minibt/outputs.py), never through a link; the files copied from the source folder are read
    through hub.inside (nothing outside it)."""
    import json
    from pathlib import Path
    from safetensors.torch import save_file
    from ..config import read_json
    from ..hub import inside
    from ..outputs import atomic
    if not getattr(model, "quantization", None):
        raise QuantizeError("save_quantized: this model is not quantized; call quantize(model, 'int8') first")
    if getattr(model, "source", None) is None:
        raise QuantizeError("save_quantized: the model has no source folder (model.source) to copy config.json and "
                            "the tokenizer from; load it with minibt.from_hub")
    folder, src = Path(folder), Path(model.source)
    if folder.exists() and folder.resolve() == src.resolve():
        raise QuantizeError(f"save_quantized: {folder} is the folder this model was loaded from; save it to a new "
                            "folder (the quantized file would shadow the full-precision checkpoint there)")
    config = read_json(inside(src, "config.json"), required=True)
    check_save_folder(folder, config)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantizeError(f"save_quantized: cannot make {folder}: {e.strerror or e}") from None
    tensors, aliases = saved_tensors(model)
    q = model.quantization
    manifest = dict(format=FORMAT, version=VERSION, scheme=q["scheme"], group_sizes=q["group_sizes"],
                    modules=q["modules"], dtype=str(model_dtype(model)).removeprefix("torch."), family=model.family,
                    model_type=config.get("model_type"), head=model.head, config_hash=config_hash(config),
                    aliases=aliases, torch=torch.__version__)
    with atomic(folder / QUANTIZED_FILE, QuantizeError, "quantized file") as tmp:
        save_file(tensors, tmp, metadata={"minibt": json.dumps(manifest)})
    copy_source_files(src, folder)
    return folder


def saved_tensors(model) -> tuple[dict, dict]:
    """(name -> tensor to store, alias name -> stored name): int4 codes in our layout (save_quantized's docstring),
    a tie left in float stored once."""
    tensors, seen = {}, {}
    for name, t in model.state_dict().items():
        if name.endswith(".packed"):                       # the kernel's layout -> ours
            codes = model.get_submodule(name.rpartition(".")[0]).codes().to(torch.uint8)
            name, t = name[:-len("packed")] + "codes", codes[:, 0::2] | (codes[:, 1::2] << 4)
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in seen:                                    # a tie left in float: store once, name the alias
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    aliases = {n: seen[(t.data_ptr(), t.shape, t.dtype)] for n, t in model.state_dict().items()
               if seen.get((t.data_ptr(), t.shape, t.dtype), n) != n}
    return tensors, aliases


def copy_source_files(src, folder) -> None:
    """config.json and the tokenizer files (hub.ALLOW, no weights) from the source folder, each read through
    hub.inside and written atomically, never outside `folder`."""
    from ..hub import ALLOW, inside
    from ..outputs import atomic
    inside_out = folder.resolve()
    for pattern in ALLOW:
        for path in src.glob(pattern):
            name = path.relative_to(src).as_posix()
            if path.suffix == ".safetensors" or name == "model.safetensors.index.json":
                continue
            source = inside(src, name)                     # a link leading out of the source folder is refused
            if not source.is_file():
                continue
            dst = folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.parent.resolve().is_relative_to(inside_out):
                raise QuantizeError(f"save_quantized: {dst.parent} leads outside {folder}; refused")
            with atomic(dst, QuantizeError, "copy of " + name) as tmp:
                tmp.write_bytes(source.read_bytes())


def check_save_folder(folder, config: dict) -> None:
    """save_quantized's rule: the target folder is new, empty, or a quantized folder of the same config.json (no
    full checkpoint in it); anything else is refused, naming what the folder holds."""
    from ..config import read_json
    if not folder.exists():
        return
    if not folder.is_dir():
        raise QuantizeError(f"save_quantized: {folder} exists and is not a folder")
    if not any(folder.iterdir()):
        return
    from ..hub import inside
    full = any((folder / n).exists() for n in ("model.safetensors", "model.safetensors.index.json"))
    theirs = read_json(inside(folder, "config.json"), error=QuantizeError)
    if full or not (folder / QUANTIZED_FILE).is_file() or theirs is None or config_hash(theirs) != config_hash(config):
        held = sorted(p.name for p in folder.iterdir())
        raise QuantizeError(f"save_quantized: {folder} already holds {', '.join(held[:4])}"
                            f"{', ...' if len(held) > 4 else ''}, not a quantized folder of this model; refused (its "
                            "config.json would be overwritten). Save into a new or empty folder, or over a quantized "
                            "folder of this same model")


def model_dtype(model) -> torch.dtype:
    return next(t.dtype for t in model.state_dict().values() if t.is_floating_point())


def read_manifest(meta: dict, path) -> dict:
    from ..config import loads
    if "minibt" not in meta:
        raise QuantizeError(f"{path}: no minibt manifest in the safetensors metadata (key 'minibt')")
    manifest = loads(meta["minibt"], f"{path}: manifest (safetensors metadata 'minibt')", error=QuantizeError)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise QuantizeError(f"{path}: manifest format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                            f"this minibt reads {FORMAT!r} version {VERSION}")
    if manifest.get("scheme") not in SCHEMES:
        raise QuantizeError(f"{path}: manifest scheme {manifest.get('scheme')!r} is not one of {', '.join(SCHEMES)}")
    fields = {"family": str, "head": str, "config_hash": str, "dtype": str, "modules": list, "group_sizes": dict,
              "aliases": dict}
    for key, kind in fields.items():
        if not isinstance(manifest.get(key), kind):
            raise QuantizeError(f"{path}: manifest field {key!r} is missing or not a {kind.__name__}")
    dtype = getattr(torch, manifest["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuantizeError(f"{path}: manifest dtype {manifest['dtype']!r} is not a floating-point torch dtype")
    if not all(isinstance(m, str) for m in manifest["modules"]) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in manifest["aliases"].items()):
        raise QuantizeError(f"{path}: manifest 'modules' must list names and 'aliases' map names to names")
    if manifest["scheme"] == "int4" and (set(manifest["group_sizes"]) != set(manifest["modules"]) or any(
            v not in GROUP_SIZES for v in manifest["group_sizes"].values())):
        raise QuantizeError(f"{path}: manifest 'group_sizes' must give every module one of "
                            f"{', '.join(map(str, GROUP_SIZES))}")
    return manifest


def saved_file(folder) -> "Path | None":
    """The quantized file of a folder written by save_quantized, or None; a link leading outside the folder is
    refused (hub.inside)."""
    from ..hub import inside
    path = inside(folder, QUANTIZED_FILE, "quantized file")
    return path if path.exists() or path.is_symlink() else None


def check_saved(manifest: dict, config: dict, family: str, path, *, scheme=None, dtype=None, head=None) -> None:
    """A saved quantized model loads as it was saved: refuse (QuantizeError) a manifest written for another
    config.json or family, or a scheme, dtype or head other than the ones asked for (None: as saved)."""
    where = f"{path}: manifest"
    if scheme is not None:
        check_scheme(scheme)
        if scheme != manifest["scheme"]:
            raise QuantizeError(f"{where} says scheme {manifest['scheme']!r}, but quantize={scheme!r} was asked for; "
                                "re-quantize from the full-precision checkpoint")
    if manifest["config_hash"] != config_hash(config):
        raise QuantizeError(f"{where} was written for a config.json with hash {manifest['config_hash']}, and the "
                            f"folder's config.json hashes to {config_hash(config)}: the quantized weights belong to "
                            "another model (or config.json was edited)")
    if family != manifest["family"]:
        raise QuantizeError(f"{where} family {manifest['family']!r} does not match config.json "
                            f"model_type={config.get('model_type')!r}")
    saved = getattr(torch, manifest["dtype"])
    for asked, have, what in ((dtype, saved, "dtype"), (head, manifest["head"], "head")):
        if asked is not None and asked != have:
            raise QuantizeError(f"{where} says {what} {manifest[what]}; {what}={str(asked).removeprefix('torch.')} was "
                                "asked for. A quantized folder loads as it was saved: re-quantize from the "
                                "full-precision checkpoint for another one")


def saved_plan(keys, manifest: dict, path) -> tuple[dict, list]:
    """The saved file's keys are our tensor names: the loader's plan ({name: [key]}, no unexpected keys yet),
    with int4 `.codes` (our layout) feeding the kernel's `.packed` and each alias reading the tensor it names."""
    keys = set(keys)
    if any(k.endswith(".packed") for k in keys):
        raise QuantizeError(f"{path}: {next(k for k in sorted(keys) if k.endswith('.packed'))} is in torch's kernel "
                            "layout; save_quantized writes int4 weights as '.codes' (see its docstring)")
    aliases = manifest["aliases"]
    if any(alias in keys for alias in aliases):
        raise QuantizeError(f"{path}: manifest aliases {sorted(a for a in aliases if a in keys)[:3]} name tensors the "
                            "file also holds")
    if any(name not in keys for name in aliases.values()):
        raise QuantizeError(f"{path}: manifest aliases point at tensors the file does not hold: "
                            f"{sorted(n for n in aliases.values() if n not in keys)[:3]}")
    plan = {(k[:-len("codes")] + "packed" if k.endswith(".codes") else k): [k] for k in keys}
    plan.update({alias: [name] for alias, name in aliases.items()})
    return plan, []


def swap_empty(model, manifest: dict, path) -> None:
    """On the meta model: the quantized modules the manifest lists, empty, in place of the linear layers (their
    integer tensors are then filled by the loader like any other)."""
    found = targets(model)
    if found != manifest["modules"]:
        raise QuantizeError(f"{path}: manifest lists quantized modules {manifest['modules'][:3]}... "
                            f"({len(manifest['modules'])}), but this minibt quantizes {found[:3]}... ({len(found)}) "
                            "for this config")
    for name in found:
        old = model.get_submodule(name)
        bias = None if old.bias is None else torch.empty(old.out_features, dtype=old.weight.dtype)
        if manifest["scheme"] in ("int8", "w8a8"):
            new = (Int8Linear if manifest["scheme"] == "int8" else W8A8Linear)(old.in_features, old.out_features, bias)
        else:
            new = Int4Linear(old.in_features, old.out_features, bias, manifest["group_sizes"][name])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def from_saved(model, name: str, t: torch.Tensor, path) -> torch.Tensor:
    """A tensor of the saved file as the model holds it: int4 codes (two 4-bit codes a byte, our layout) repacked
    into the kernel's layout; everything else as read."""
    if name.endswith((".scale", ".scale_zero")):
        check_scales(name, t, path)
    if name.endswith(".qweight") and t.dtype == torch.int8 and bool((t == -128).any()):
        raise QuantizeError(f"{path}: tensor {name!r} holds the code -128, which the symmetric int8 scheme never "
                            "writes (codes are -127..127): the file was edited; refused")
    if not name.endswith(".packed"):
        return t
    mod = model.get_submodule(name.rpartition(".")[0])
    codes = torch.stack([t & 15, t >> 4], -1).view(t.shape[0], -1).to(torch.int32)
    if codes.shape[1] != mod.in_features:
        raise QuantizeError(f"{path}: {name[:-len('packed')]}codes has {codes.shape[1]} codes a row; the layer has "
                            f"{mod.in_features} inputs")
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1)


def check_scales(name: str, t: torch.Tensor, path) -> None:
    """Scales save_quantized can have written: int8 `scale` in [1e-12 / 127, float32 max / 127] (max|row| / 127);
    int4 `scale_zero` scales finite and > 0, zeros finite. Anything else was edited: refused, naming the tensor
    (it would give NaN or inf outputs)."""
    scales, zeros = (t, None) if name.endswith(".scale") else (t[..., 0], t[..., 1])
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if zeros is None:                                   # int8: max|row| / 127 in fp32, the row max at least 1e-12
        bad |= (scales < 1e-12 / 127 * (1 - 1e-6)) | (scales > torch.finfo(torch.float32).max / 127)
    if zeros is not None:
        bad |= ~torch.isfinite(zeros)
    if bool(bad.any()):
        first = t[bad][0].tolist()                      # a scale, or an int4 group's [scale, zero]
        raise QuantizeError(f"{path}: tensor {name!r} holds {int(bad.sum())} scale value(s) save_quantized cannot "
                            f"have written (first: {first}; scales are finite and > 0, zeros finite): the file was "
                            "edited; refused")
