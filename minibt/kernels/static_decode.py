"""A compile-static decode step (the gpt-fast way): one token per row through the model's own layers, every shape
fixed, compiled whole with torch.compile(fullgraph=True). `generate(..., compile=True)` runs the prefill eagerly,
then every decode step through it.

What makes the step static (issue 28; each item was measured to matter, AMD Zen 4, 2 cores, SmolLM2-135M):
- the KV cache is the generation's own KVCache (attention/cache.py): one fixed-size tensor per layer (a ring of W
  slots for a layer with a window of W), written with `index_copy_` at a position *tensor* (`at`). Views into one
  5-D cache made inductor copy the whole cache every step.
- attention runs over every slot of the cache with a mask (the padding of the prompt, the keys not written yet, and
  for a ring which slot holds which position): the same length every step, so one graph serves them all.
- RoPE is read from a table of cos/sin for the generation's positions, made once (no `positions.max()` read back).
- no host reads in the step: the forward's input checks (ids, mask, positions) ran on the prefill; the step takes
  only tensors.
- one row (a batch of one on the CPU): every linear layer takes decode_linear.one_row, a vectorized reduction that
  streams the weight's rows (fp32 weights re-laid row-major for it, int8 weights as stored), and every pointwise
  result is stored once before its readers (realize_opcount_threshold 0): inductor's default inlined each norm into
  the products reading it and recomputed it per weight row (bf16: 27.9 tok/s with it, 63.5 without, in a probe).
  SmolLM2-135M batch 1, default mode, AMD Zen 4, 2 threads (docs/benchmarks.md generate_quantized): fp32 61.1,
  bf16 91.7, int8 115.8, int4 114.1 tok/s (the step before, max-autotune with aten's products: 21.9, 27.7, 54.6).
  Where an int8 step's ~8.5 ms go: ~6.5 ms in the products (the same step with every product replaced by a
  trivial one took 1.7-2.3 ms), i.e. ~20 GB/s for 134 MB of weights; the rest is inductor's three fused C++ kernels'
  small serial loops and their OpenMP barriers (~630 per step), attention over the cache (11.8 MB of fp32 keys and
  values), and the Python wrapper. Measured and not kept (interleaved, same process): the C++ wrapper (-0.2 ms),
  no size asserts (-0.1 ms), realize_opcount_threshold 3 or aggressive_fusion (slower), pausing the garbage
  collector (no collection ran in 320 steps), weights in 2 MiB pages (8.04 vs 8.06 ms).
The layers are the model's own modules, called with a `StaticBatch` in place of attention/batch.py's `Batch`; only
each family's two ends (embeddings, final norm and head) are restated here, in `ENDS`. The attention is naive.py's
formula (scores in fp32, the variants in the same order), so every variant the layers ask for is computed.

Compile modes (`MODES`, the `compile=` argument of generate):
- "default": inductor's defaults (compiles in seconds on a tiny model, ~60-80 s for SmolLM2-135M's 30 layers: what
  `compile=True`, the tests and benchmarks/generate.py use).
- "max-autotune": on CPU, inductor's autotuned C++ GEMM templates, freezing (weights folded in as constants) and the
  C++ wrapper (no Python between kernels); on CUDA, autotuned Triton kernels. With one_row it measured no faster
  here (int8 98 vs 95 tok/s, int4 92 vs 102) and compiles for ~120 s.
On CUDA both modes add CUDA graphs (one replay per step: "reduce-overhead"); the cache tensors are kept per model
and shape and marked as static addresses, so the graph writes them in place and every generation replays it.

Compile cost is paid once per machine. On the CPU the step is compiled ahead (torch's aot_compile) for the first
call's shapes and saved under $TORCHINDUCTOR_CACHE_DIR (~/.cache/minibt/inductor when unset) in minibt-steps/, by a
key of everything it was compiled for: a second process loads it, checks its guards once and calls it without
dynamo (no re-tracing, no guards per step; see "Saved steps" below). SmolLM2-135M int8: its first compiled step
~4.5 s after loading, against 12-15 s when dynamo re-traced the 30 layers and read inductor's cache. On CUDA (and
with a torch without aot_compile, or in max-autotune, which freezes the weights into the code) the step is compiled
just in time; inductor's on-disk caches still spare the second process the kernel builds.

Families: OPT, BLOOM (ALiBi), Llama and its relatives (Mistral, Qwen 2/3, Gemma 2: windows, softcaps). gpt-oss is
refused (its mixture of experts routes each token to experts chosen at run time: no static shape), and so is a
dynamic-RoPE model asked for more than max_position_embeddings (its frequencies change with the length).
"""
from __future__ import annotations

import functools
import hashlib
import os
import types
import warnings
import weakref
from pathlib import Path

import torch

from ..attention import KVCache
from ..errors import BackendError
from ..models import OPT, Bloom, GptOss, Llama
from ..models.opt import POSITION_OFFSET
from .decode_linear import row_major

MODES = {
    "default": {},
    "max-autotune": {"cpu": {"max_autotune": True, "freezing": True, "cpp_wrapper": True},
                     "cuda": {"max_autotune": True}},
}
CACHE_DIR = Path.home() / ".cache" / "minibt" / "inductor"
BUCKET = 128                       # cache capacity rounds up to this: one compiled graph serves many lengths


def check(model, mode: str, length: int) -> None:
    """Refuse, by name, what the static step cannot run exactly."""
    if not isinstance(mode, str) or mode not in MODES:
        raise BackendError(f"compile={mode!r}: choose True, 'default' or 'max-autotune'")
    if isinstance(model, GptOss) or not isinstance(model, (OPT, Bloom, Llama)):
        raise BackendError(f"compile=True: the static decode step does not run {model.family} (gpt-oss: its "
                           "mixture of experts picks experts per token at run time, no static shape); "
                           "use compile=False")
    if isinstance(model, Llama) and model.config.rope["rope_type"] == "dynamic" and length > model.config.max_positions:
        raise BackendError(f"compile=True: dynamic RoPE rescales its frequencies past max_position_embeddings "
                           f"({model.config.max_positions}); this generation needs {length} positions: use "
                           "compile=False")


def new_cache(model, batch: int, length: int) -> KVCache:
    """The generation's KV cache, `length` rounded up to BUCKET. On CUDA, one per model and shape, reused by the
    generations that follow (`StaticDecoder.release`): a CUDA graph replays on the addresses it recorded (marked
    static, unguarded). A generation takes it while it runs: a concurrent one makes its own."""
    size = -(-length // BUCKET) * BUCKET
    if model.embed.weight.device.type != "cuda":
        return KVCache.for_model(model, batch, size)
    cache = model.__dict__.setdefault("_static_caches", {}).pop((batch, size), None)
    if cache is None:
        cache = KVCache.for_model(model, batch, size)
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t, guard=False)
    cache.filled = [0] * len(cache.filled)        # stale keys are masked (never attended), so not cleared
    return cache


class StaticBatch:
    """What a layer reads from attention/batch.py's Batch, for one decode step over a fixed-size cache: `rope`,
    `cache.write`, `past` (the position tensor), `packing` (never) and `attend`."""

    packing = None

    def __init__(self, at, key_ok, ks, vs, rope=None):
        self.at, self.past, self.key_ok, self.rope = at, at, key_ok, rope
        self.k, self.v, self.capacity = ks, vs, key_ok.shape[1]
        self.cache = self
        self._masks = {}

    def write(self, layer: int, k, v, at, packing=None):
        """k, v (B, Hkv, 1, D) into slot at (a ring: at % W) of the layer's cache; returns all its slots."""
        slot = (at % self.k[layer].shape[2]).view(1)
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]

    def keys(self, slots: int):
        """(allowed (B, 1, 1, slots) bool, the position each slot holds (slots,)) for a cache of `slots` slots.
        A full cache: slot j holds position j, seen when j <= at and not padding. A ring of W (a window of W keys):
        slot j holds the last position p <= at with p % W == j, seen when p >= 0 and not padding; those are exactly
        the window's keys."""
        if slots not in self._masks:
            j = torch.arange(slots, device=self.key_ok.device)
            pos = j if slots == self.capacity else self.at - (self.at - j) % slots
            ok = self.key_ok.gather(1, pos.clamp(min=0).expand(self.key_ok.shape[0], -1)) & (pos >= 0) & (pos <= self.at)
            self._masks[slots] = ok[:, None, None, :], pos
        return self._masks[slots]

    def attend(self, q, k, v, *, scale: float, window=None, alibi=None, relative=None, softcap=None, sinks=None):
        """attention/naive.py's formula for one query per row over every slot; (out (B, Hq, 1, D), None)."""
        if relative is not None:
            raise BackendError("compile=True: relative-position buckets are not in the static decode step")
        b, hq, sq, d = q.shape
        hkv, slots = k.shape[1], k.shape[2]
        allowed, pos = self.keys(slots)
        acc = torch.promote_types(q.dtype, torch.float32)
        qg = q.to(acc).view(b, hkv, hq // hkv, sq, d)                                # (B, Hkv, G, 1, D)
        scores = qg @ k.to(acc).unsqueeze(2).transpose(-1, -2) * scale                # (B, Hkv, G, 1, slots)
        if alibi is not None:
            distance = (pos - self.at).abs().to(acc)                                  # (slots,)
            scores = scores - (alibi.to(acc)[:, None] * distance).view(1, hkv, hq // hkv, 1, slots)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        if sinks is None:
            probs = scores.softmax(-1)
        else:
            sink = sinks.to(acc).view(1, hkv, hq // hkv, 1, 1).expand(b, -1, -1, sq, 1)
            probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        out = (probs @ v.to(acc).unsqueeze(2)).view(b, hq, sq, v.shape[3]).to(q.dtype)
        return out, None


# Each family's two ends of a decode step, as its forward writes them: (ids (B, 1), positions (B, 1), batch) -> x,
# and x (B, 1, H) -> logits (B, 1, V).
def _llama_in(model, ids, positions, batch):
    batch.rope = (batch.rope[0][positions], batch.rope[1][positions])              # (B, 1, D) each
    return model.embeddings(ids)


def _opt_in(model, ids, positions, batch):
    x = model.embed(ids)
    if model.project_in is not None:
        x = model.project_in(x)
    return x + model.positions(positions + POSITION_OFFSET)


def _opt_out(model, x):
    if model.final_norm is not None:
        x = model.final_norm(x)
    if model.project_out is not None:
        x = model.project_out(x)
    return model.lm_head(x)


ENDS = {
    Llama: (_llama_in, lambda model, x: model.logits(model.norm(x))),
    OPT: (_opt_in, _opt_out),
    Bloom: (lambda model, ids, positions, batch: model.embed_norm(model.embed(ids)),
            lambda model, x: model.lm_head(model.final_norm(x))),
}


def step(model, ids, at, positions, key_ok, ks, vs, rope):
    """One decode step: ids (B, 1) at cache position `at` (a 0-dim tensor), RoPE / OPT positions (B, 1),
    key_ok (B, capacity) the real tokens, ks / vs each layer's cache -> logits (B, V). Writes the caches."""
    begin, end = next(v for cls, v in ENDS.items() if isinstance(model, cls))
    batch = StaticBatch(at, key_ok, ks, vs, rope)
    x = begin(model, ids, positions, batch)
    for layer in model.layers:
        x, _ = layer(x, batch)
    return end(model, x)[:, -1]


def rope_table(model, length: int, size: int, dtype, device):
    """cos, sin (size, D) for positions 0 .. length - 1 by the model's own RotaryEmbedding (zeros past them);
    (None, None) for families without RoPE."""
    if not isinstance(model, Llama):
        return None
    cos, sin = model.rope(torch.arange(length, device=device)[None], dtype)
    pad = torch.zeros(size - length, cos.shape[-1], dtype=dtype, device=device)
    return torch.cat([cos[0], pad]), torch.cat([sin[0], pad])


def options(mode: str, kind: str) -> dict:
    """inductor's options for the step in `mode` on a `kind` ("cpu" / "cuda") device."""
    # emulate_precision_casts: round where eager rounds. CPU, realize_opcount_threshold 0: every pointwise result
    # is stored once before its readers; inductor's CPU default (50 ops) inlined each norm into the one-row products
    # that read it (decode_linear.one_row), recomputing the norm for every weight row: bf16 SmolLM2 27.9 -> 63.5
    # tok/s, fp32 44.9 -> 47.5 (default mode, AMD Zen 4, 2 threads). CUDA: CUDA graphs.
    device_options = {"cpu": {"realize_opcount_threshold": 0}, "cuda": {"triton.cudagraphs": True}}[kind]
    return {"emulate_precision_casts": True, **device_options, **MODES[mode].get(kind, {})}


def cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR, set to CACHE_DIR when unset (inductor's caches and the saved steps live there)."""
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR)))


def compiled(model, mode: str, device):
    """The step just in time: torch.compile'd for `model`'s device in `mode`, made once per model and mode (shapes
    are static: a new batch size or capacity compiles again, a different length of the same bucket does not)."""
    cache_dir()
    kind = "cuda" if device.type == "cuda" else "cpu"
    store = model.__dict__.setdefault("_static_steps", {})
    if mode not in store:
        # dynamo keeps at most recompile_limit (8) graphs per code object: each model compiles its own copy of
        # step's code, so that models (and their batch sizes and buckets) do not share that budget
        own = types.FunctionType(step.__code__.replace(), step.__globals__, "step")
        store[mode] = torch.compile(own, fullgraph=True, dynamic=False, options=options(mode, kind))
    return store[mode]


# Saved steps (CPU). A second process should not trace the model again (dynamo: ~6 s for SmolLM2's 30 layers), and
# a step should not evaluate dynamo's guards (~1.4 ms of a 10 ms int8 step). So on the CPU the step is compiled
# ahead for the first call's arguments (torch's aot_compile: the traced graph, its guards and inductor's compiled
# code), saved under the cache dir by a key of everything it was compiled for (torch, minibt's sources, the model's
# class, config, module types and tensor layouts, the arguments' layouts, the mode, the CPU and its thread count),
# loaded by the next process, its guards checked once against the first call's arguments, and then called without
# them: a generation's steps take tensors of the same layouts by construction (StaticDecoder). A saved step is
# pickled data that this process (or an earlier one) wrote under the user's own cache dir, as inductor's caches
# are; it is never read from a checkpoint.
STEPS_DIR = "minibt-steps"
SAVED = weakref.WeakKeyDictionary()     # model -> {key: step}; not in the model's __dict__, which guards pickle


def saved_step(model, mode: str, args: tuple):
    """The CPU step for `args` (step's arguments after `model`): from this model's store, else from disk, else
    compiled ahead now and saved; its guards checked once, then off."""
    store = SAVED.setdefault(model, {})
    key = step_key(model, mode, args)
    if key not in store:
        path = cache_dir() / STEPS_DIR / f"{key}.bin"
        fn = load_step(path, model, args)
        if fn is None:
            fn = torch.compile(step, fullgraph=True, dynamic=False, options=options(mode, "cpu")).aot_compile(
                ((model, *args), {}))
            if not fn.guard_check(model, *args):
                raise BackendError("compile=True: the step compiled ahead refuses the arguments it was compiled for")
            save_step(fn, path)
        fn.disable_guard_check()
        store[key] = fn
    return store[key]


def load_step(path: Path, model, args: tuple):
    """The step saved at `path` if there is one and its guards take (model, *args); else None (a file that does not
    load or does not fit is compiled again and replaced, with a warning)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            fn = torch.compiler.load_compiled_function(f, f_globals=step.__globals__)
        if fn.guard_check(model, *args):
            return fn
        reason = "its guards refuse these arguments"
    except Exception as e:                      # a truncated or foreign file, or one from another torch build
        reason = f"{type(e).__name__}: {e}"
    warnings.warn(f"compile=True: the saved decode step {path} is not usable ({reason[:300]}); compiling it again",
                  stacklevel=4)
    return None


def save_step(fn, path: Path) -> None:
    """Write the compiled step to `path` (atomically); a step that cannot be written stays in this process only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fn.save_compiled_function(str(path))
    except Exception as e:
        warnings.warn(f"compile=True: the decode step could not be saved to {path} ({type(e).__name__}: "
                      f"{str(e)[:300]}); the next process compiles it again", stacklevel=4)


def step_key(model, mode: str, args: tuple) -> str:
    """A digest of everything the saved step was compiled for (see Saved steps above)."""
    def layout(value):
        if isinstance(value, torch.Tensor):
            return (str(value.dtype), value.device.type, tuple(value.shape), value.stride())
        if isinstance(value, (list, tuple)):
            return [layout(v) for v in value]
        return repr(value)
    what = [torch.__version__, source_digest(), type(model).__qualname__, repr(model.config), mode,
            torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), layout(args),
            [(name, type(m).__qualname__) for name, m in model.named_modules()],
            [(name, layout(t)) for name, t in (*model.named_parameters(), *model.named_buffers())]]
    return hashlib.sha256(repr(what).encode()).hexdigest()[:32]


@functools.cache
def source_digest() -> str:
    """sha256 of minibt's own Python sources: a changed layer never reuses a step saved before the change."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parents[1].rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


class StaticDecoder:
    """The state of one generation's static steps: the cache tensors, the real-token mask, the positions and the
    RoPE table; `__call__(ids)` runs the next step and returns its logits."""

    def __init__(self, model, cache, attention_mask, length: int, mode: str):
        b, s = attention_mask.shape
        device = attention_mask.device
        if b == 1 and device.type == "cpu":
            row_major(model)                        # one row: decode_linear.one_row streams row-major weights
        self.model, self.mode, self.cache = model, mode, cache
        # CPU: the saved step (compiled ahead, no guards per step) where this torch has it, unless the mode freezes
        # the weights into the compiled code (max-autotune: a saved step must take them as arguments); CUDA: just in
        # time, with CUDA graphs
        ahead = (device.type == "cpu" and hasattr(torch.compiler, "load_compiled_function")
                 and not options(mode, "cpu").get("freezing"))
        self.step = None if ahead else compiled(model, mode, device)
        self.ks, self.vs = cache.k, cache.v
        size = cache.capacity
        self.key_ok = torch.ones(b, size, dtype=torch.bool, device=device)
        self.key_ok[:, :s] = attention_mask.bool()
        # a row's position is its real tokens so far (generate's left padding): the column minus its padding
        self.pads = (s - attention_mask.sum(1)).view(b, 1)
        self.at = torch.tensor(s, device=device)
        self.rope = rope_table(model, length, size, model.embed.weight.dtype, device)

    def __call__(self, ids):
        if self.at.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        args = (ids, self.at, self.at - self.pads, self.key_ok, self.ks, self.vs, self.rope)
        if self.step is None:
            self.step = saved_step(self.model, self.mode, args)
        logits = self.step(self.model, *args)
        self.at = self.at + 1
        return logits

    def release(self):
        """The generation is over: on CUDA its cache goes back to the model for the next one (new_cache)."""
        if self.at.device.type == "cuda":
            b, size = self.key_ok.shape
            self.model.__dict__.setdefault("_static_caches", {})[b, size] = self.cache
