"""minibt.audit: every backend on the same weights and inputs, layer by layer against naive in float64."""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import attention
from ..attention import Backend
from ..attention import Packing

RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}   # on max relative error
# A quantized model's linears compute with bf16 activations whatever its dtype (kernels/quantize.py), so its own
# float64 reference (the same integer weights, exact) is met to bf16's tolerance, not its dtype's.
QUANTIZED_TOLERANCE = RELATIVE_TOLERANCE[torch.bfloat16]
# What each kind of backend is compared on: an attention function is traced call by call; `auto` picks a function
# per call, so its layers' outputs are compared; `fused` runs the whole stack in one call, so only its last output.
COMPARED = {"function": "attention and layer outputs", "route": "layer outputs", "transform": "last layer output"}


def tolerance(model) -> float:
    """The max relative error `audit` accepts for this model against naive in float64."""
    dtype = next(model.parameters()).dtype
    quantized = bool(getattr(model, "quantization", None))
    return max(RELATIVE_TOLERANCE[dtype], QUANTIZED_TOLERANCE) if quantized else RELATIVE_TOLERANCE[dtype]


def _kind(backend: Backend) -> str:
    return "route" if backend.route is not None else "transform" if backend.transform is not None else "function"


@dataclass
class AuditResult:
    dtype: torch.dtype
    layers: int
    rows: list = field(default_factory=list)       # one dict per backend and layer (attn_* None: not compared)
    summary: dict = field(default_factory=dict)    # backend -> {compared, ms, peak_mb, first_bad_layer, max_rel}
    refused: dict = field(default_factory=dict)    # backend -> why it cannot run this model (one line)
    variants: tuple = ()                           # the model's attention variants (attention/mask.py)
    title: str = ""                                # names the model and dtype on plots
    tolerance: float = 0.0                         # max relative error accepted (tolerance(model))
    quantized: str = ""                            # the model's quantization scheme, "" for float weights

    def table(self) -> str:
        why = f"; {self.quantized} linears compute in bf16" if self.quantized else ""
        lines = ["| backend | compared with naive in float64 (real tokens) | ms / forward | peak live MB | "
                 f"max rel. error | first layer out of tolerance ({self.tolerance:.0e}{why}) |",
                 "|---|---|---|---|---|---|"]
        for name, s in self.summary.items():
            bad = "none" if s["first_bad_layer"] is None else str(s["first_bad_layer"])
            lines.append(f"| {name} | {s['compared']} | {s['ms']:.1f} | {s['peak_mb']:.1f} | {s['max_rel']:.1e} | "
                         f"{bad} |")
        for name, why in self.refused.items():
            lines.append(f"| {name} | refused: {why} | | | | |")
        lines += ["", "| backend | layer | attention max abs | attention max rel | hidden max abs | hidden max rel |",
                  "|---|---|---|---|---|---|"]
        cell = lambda x: "n/a" if x is None else f"{x:.1e}"                      # n/a: auto and fused rows
        for r in self.rows:
            lines.append(f"| {r['backend']} | {r['layer']} | {cell(r['attn_abs'])} | {cell(r['attn_rel'])} | "
                         f"{cell(r['hidden_abs'])} | {cell(r['hidden_rel'])} |")
        return "\n".join(lines)


def _trace(model, backend: Backend, inputs: dict):
    """Run one forward with `backend`, as real tokens (1, T, ...): -> (each layer's attention output, or None when
    not traced; each layer's output, or only the last for a transform that runs the stack in one call; the
    attention functions that ran)."""
    attn_out, hidden, last, ran = [], [], [], set()
    pack = Packing(inputs["attention_mask"].bool()).pack
    real = lambda t, batch: t if batch.packing is not None else pack(t)            # compare real tokens only

    def recording(q, k, v, *, mask, scale):
        out = backend.fn(q, k, v, mask=mask, scale=scale)
        attn_out.append(out.transpose(1, 2))                                    # (B|1, S|T, Hq, D)
        return out

    def layer_done(module, args, out):                                          # args (x, batch), out (x, probs)
        hidden.append(real(out[0], args[1]))
        ran.add(args[1].backend.name)
    saved = model.attn
    model.set_attention(backend.name)                    # a transform (fused) swaps model.layers here
    if _kind(backend) == "function":
        model.backend = Backend(backend.name, recording, backend.packed, variants=backend.variants)
    hooks = [layer.register_forward_hook(layer_done) for layer in model.layers]
    # the stack as one module (BERT's LayerStack, the fused one): its output is the last layer's; a plain
    # ModuleList is never called, and its hook never runs
    hooks.append(model.layers.register_forward_hook(lambda m, a, out: last.append(real(out[0], a[1]))))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        model.set_attention(saved)
        for h in hooks:
            h.remove()
    if _kind(backend) == "function":
        as_real = (lambda t: t) if backend.packed else pack
        return [as_real(a) for a in attn_out], hidden, ran
    return None, hidden or last, ran


def _peak_live_bytes(fn) -> int:
    """Peak of live bytes allocated by torch ops during fn (CPU profiler; CUDA: the allocator's own peak)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import profile
    with _quiet_stderr(), profile(profile_memory=True) as prof:     # the profiler's C++ side logs to fd 2
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _compare_layers(result: AuditResult, name: str, ref, got) -> tuple:
    """One row per layer of `got` (attention outputs or None, layer outputs) against the float64 reference `ref`
    (fused gives the last layer only) into result.rows; (the first layer out of tolerance or None, the worst
    relative error)."""
    (ref_attn, ref_hidden), (attn, hidden) = ref, got
    layers = range(len(ref_hidden) - len(hidden), len(ref_hidden))
    first_bad, worst = None, 0.0
    for i, h in zip(layers, hidden):
        rh = ref_hidden[i]
        row = dict(backend=name, layer=i, attn_abs=None, attn_rel=None, hidden_abs=(h.double() - rh).abs().max().item())
        row["hidden_rel"] = row["hidden_abs"] / max(rh.abs().max().item(), 1e-30)
        if attn is not None:
            ra = ref_attn[i]
            row["attn_abs"] = (attn[i].double() - ra).abs().max().item()
            row["attn_rel"] = row["attn_abs"] / max(ra.abs().max().item(), 1e-30)
        err = max(row["hidden_rel"], row["attn_rel"] or 0.0)
        worst = max(worst, err)
        if first_bad is None and err > result.tolerance:
            first_bad = i
        result.rows.append(row)
    return first_bad, worst


def _time(model, inputs: dict, repeats: int) -> tuple:
    """(median ms of a forward after a warm-up, peak live bytes of one)."""
    with torch.inference_mode():
        model(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
        peak = _peak_live_bytes(lambda: model(**inputs))
    return statistics.median(times) * 1e3, peak


def audit(model, inputs: dict, backends=None, *, repeats: int = 3, out_dir=None, title: str = "",
          progress=None) -> AuditResult:
    """inputs: the model's keyword inputs (input_ids, attention_mask[, token_type_ids]). Reference: naive in
    float64 on a copy of the model. backends: any names in minibt.attention.backends() (default: the attention
    functions). An attention function is compared layer by layer on its attention outputs and layer outputs;
    `auto` on each layer's output (it picks a function per call; the row names those it ran); `fused` on the last
    layer's output (it runs the whole stack in one call). A backend that cannot run this model is refused by name
    (AuditResult.refused), never run. Prints nothing; see AuditResult.table() and write_report().
    title: names the model on plots; progress: called with each backend's name when it is done."""
    if out_dir is not None:                       # a bad --out is refused before the work, not after
        from .attention_map import output_folder
        out_dir = output_folder(out_dir)
    from ..errors import BackendError
    inputs = dict(inputs)
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    names = list(backends) if backends else attention.functions()
    for name in names:
        attention.get(name)                                     # an unknown name: BackendError naming it
    dtype = next(model.parameters()).dtype
    ref = copy.deepcopy(model).to(torch.float64)
    ref_attn, ref_hidden, _ = _trace(ref, attention.get("naive"), inputs)
    scheme = (getattr(model, "quantization", None) or {}).get("scheme", "")
    result = AuditResult(dtype, len(model.layers), title=title, variants=tuple(sorted(model.variants)),
                         tolerance=tolerance(model), quantized=scheme)
    saved_attn = model.attn
    try:
        for name in names:
            backend = attention.get(name)
            missing = sorted(set(model.variants) - backend.variants) if _kind(backend) == "function" else []
            try:
                if missing:                                     # refused by name, never run on another backend
                    raise BackendError(f"cannot compute {', '.join(missing)}")
                model.set_attention(name)                       # fused checks here that it can run this model
            except BackendError as e:
                result.refused[name] = str(e)
                if progress is not None:
                    progress(name)
                continue
            attn, hidden, ran = _trace(model, backend, inputs)
            model.set_attention(name)
            kind = _kind(backend)
            compared = COMPARED[kind] + (f" ({name} ran {', '.join(sorted(ran))})" if kind == "route" else "")
            first_bad, worst = _compare_layers(result, name, (ref_attn, ref_hidden), (attn, hidden))
            ms, peak = _time(model, inputs, repeats)
            result.summary[name] = dict(compared=compared, ms=ms, peak_mb=peak / 2**20, first_bad_layer=first_bad,
                                        max_rel=worst)
            if progress is not None:
                progress(name)
    finally:
        model.set_attention(saved_attn)
    if out_dir is not None:
        write_report(result, Path(out_dir))
    return result


def write_report(result: AuditResult, folder: Path) -> Path:
    """report.md, and PNG plots (errors by layer, time and memory by backend) when matplotlib is installed; each
    written atomically, never through a link (minibt/outputs.py)."""
    from ..outputs import atomic, write_bytes
    from .attention_map import output_folder
    folder = output_folder(folder)
    text = ["# minibt audit", "", f"dtype {str(result.dtype).removeprefix('torch.')}, reference: naive in float64.",
            "", result.table(), ""]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        text.append("(matplotlib is not installed: no plots; pip install 'minibt[plot]')")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in result.summary:
            pts = [(r["layer"], max(r["hidden_rel"], 1e-18)) for r in result.rows if r["backend"] == name]
            ax.semilogy([p for p, _ in pts], [e for _, e in pts], marker="o", label=name)
        ax.axhline(result.tolerance, color="k", linestyle=":", label="tolerance")
        ax.set_xlabel("layer")
        ax.set_ylabel("max relative error of hidden states vs naive fp64")
        ax.set_title(result.title or f"dtype {str(result.dtype).removeprefix('torch.')}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic(folder / "errors.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        for key, label, file in (("ms", "ms per forward", "time.png"), ("peak_mb", "peak live MB", "memory.png")):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.bar(list(result.summary), [s[key] for s in result.summary.values()])
            ax.set_ylabel(label)
            ax.set_title(result.title or f"dtype {str(result.dtype).removeprefix('torch.')}")
            fig.tight_layout()
            with atomic(folder / file) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        plt.close("all")
        text += ["![errors by layer](errors.png)", "![time](time.png)", "![memory](memory.png)"]
    write_bytes(folder / "report.md", ("\n".join(text) + "\n").encode())
    return folder


# ---------------------------------------------------------------------------------------------- quantization drift

@dataclass
class QuantAudit:
    scheme: str
    rows: list = field(default_factory=list)       # one dict per layer, then one for the output
    backend: str = "sdpa"                          # what both models ran

    def table(self) -> str:
        lines = [f"Quantization error: {self.scheme} weights against the full-precision model, both on {self.backend}, "
                 "real tokens: a measured figure, not checked against a tolerance (the backend audit checks each "
                 f"backend on the {self.scheme} model against that model's own float64 reference).",
                 "", "| layer | hidden max abs | hidden max rel | min cosine per token |", "|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['layer']} | {r['abs']:.2e} | {r['rel']:.2e} | {r['cos']:.5f} |")
        return "\n".join(lines)


def audit_quantized(fp_model, q_model, inputs: dict, backend: str = "sdpa") -> QuantAudit:
    """How far a quantized model (minibt.kernels.quantize) drifts from the full-precision one, layer by layer:
    both run `backend` on the same inputs; per layer output and for the final output (logits when the model has a
    head, else the last hidden state), max abs / max rel error and the min cosine over real tokens.
    CLI (`minibt audit --quantize int8`): print audit(q_model, ...).table() and audit_quantized(fp, q, ...).table()."""
    from ..errors import InputError
    if getattr(fp_model, "quantization", None):
        raise InputError("audit_quantized: the first model is quantized too, so there is no full-precision reference "
                         "(a folder written by save_quantized holds only the quantized weights: audit against the "
                         "original checkpoint)")
    inputs = dict(inputs)
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    real = inputs["attention_mask"].bool()
    traces = []
    for model in (fp_model, q_model):
        hidden = []
        hooks = [layer.register_forward_hook(lambda m, a, out: hidden.append(out[0])) for layer in model.layers]  # (x, probs)
        saved = model.attn
        try:
            with torch.inference_mode():
                out = model.set_attention(backend)(**inputs)
        finally:
            model.set_attention(saved)
            for h in hooks:
                h.remove()
        final = out.logits if out.logits is not None and out.logits.dim() == 3 else out.last_hidden_state
        traces.append([h[real] for h in hidden] + [final[real]])          # (T, H): real tokens only
    result = QuantAudit((q_model.quantization or {}).get("scheme", "?"), backend=backend)
    for i, (a, b) in enumerate(zip(*traces)):
        a, b = a.double(), b.double()
        err = (b - a).abs().max().item()
        result.rows.append(dict(layer=i if i < len(traces[0]) - 1 else "output", abs=err,
                                rel=err / max(a.abs().max().item(), 1e-30),
                                cos=torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()))
    return result
