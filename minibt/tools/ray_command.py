"""`minibt embed --ray [ADDRESS] --file corpus.txt | --dir folder --out out_dir/`: the flags and the runner, kept
apart from minibt/tools/ray.py so that building the command's parser never imports ray (~1 s)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError, MinibtError


def add_arguments(parser) -> None:
    """The flags `minibt embed` gains for Ray (it already has --file, --out, --resume, --batch-tokens, --model,
    --attn, --dtype)."""
    from .cli import _number, positive          # here, not at the top: cli.py may import this module at its top
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="embed --file/--dir on a Ray cluster into --out folder/ as Parquet shards "
                             "(no ADDRESS: start a local Ray)")
    parser.add_argument("--dir", help="with --ray: every *.txt file under this folder, one text per line")
    parser.add_argument("--actors", type=positive, default=None,
                        help="with --ray: actors (default: the cluster's CPUs / --cpus-per-actor)")
    parser.add_argument("--cpus-per-actor", type=_number(float, 0, low_open=True), default=1,
                        help="with --ray: CPUs (torch threads) per actor (default %(default)s)")
    parser.add_argument("--shard-rows", type=positive, default=4096,
                        help="with --ray: lines per Parquet shard (default %(default)s)")
    parser.add_argument("--with-text", action="store_true", help="with --ray: keep a `text` column in the shards")


def run(args) -> dict:
    """`minibt embed --ray [ADDRESS] --file corpus.txt | --dir folder --out out_dir/`."""
    from .cli import dtype_of, model_name
    from .ray import embed_corpus, require_ray
    require_ray()
    if bool(args.file) == bool(args.dir):
        raise MinibtError("--ray needs one of --file corpus.txt or --dir folder")
    if args.file == "-":
        raise MinibtError("--ray reads its input by byte ranges on the cluster: give a file, not stdin")
    if not args.out:
        raise MinibtError("--ray needs --out out_dir/ (a folder for the Parquet shards)")
    if args.texts or args.vectors:
        raise MinibtError("--ray embeds --file/--dir into --out: give texts or --ray, not both")
    if args.dir:
        if not Path(args.dir).is_dir():
            raise InputError(f"{args.dir}: no such folder")
        sources = sorted(p for p in Path(args.dir).rglob("*.txt") if p.is_file())
        if not sources:
            raise InputError(f"{args.dir}: no *.txt files")
    else:
        sources = [Path(args.file)]
    # The command prints its own progress and one-line errors: Ray Data's notices (progress bars off, ...) are noise
    import ray.data
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = embed_corpus(sources, args.out, model_name(args), address=args.ray or None,
                           actors=args.actors, num_cpus=args.cpus_per_actor, shard_rows=args.shard_rows,
                           keep_text=args.with_text, resume=args.resume, attn=args.attn, dtype=dtype_of(args),
                           batch_tokens=args.batch_tokens)
    print(f"{summary['rows']} vectors -> {args.out} ({summary['shards_written']} shards written, "
          f"{summary['shards_skipped']} already done; rows by node: "
          f"{', '.join(f'{n[:8]} {r}' for n, r in summary['nodes'].items()) or 'none'})")
    return summary
