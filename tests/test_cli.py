"""The `minibt` command on the bundled real model and on a tiny masked-LM checkpoint; its help, the README's
command section and the parser agree; bad arguments exit 2 with one clear line."""
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import minibt
from minibt.tools import cli


ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "minibt", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def masked_lm(folder, minilm):
    """A tiny random BertForMaskedLM with the real MiniLM vocabulary (the `tiny` fixture has no tokenizer files)."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder)
    return folder


def test_embed_similarity_on_bundled_model(minilm):
    r = run("embed", "A man is eating food.", "A man is eating pasta.", "The girl plays guitar.")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "cosine similarity" and len(lines) == 4
    sims = [[float(x) for x in line.split()[-3:]] for line in lines[1:]]
    vecs = minibt.embed(minibt.from_hub(minilm), minibt.load_tokenizer(minilm),
                        ["A man is eating food.", "A man is eating pasta.", "The girl plays guitar."])
    want = (vecs @ vecs.T).tolist()
    for got_row, want_row in zip(sims, want):
        for g, w in zip(got_row, want_row):
            assert abs(g - w) < 1e-3
    assert sims[0][1] > 0.5 > sims[0][2]


def test_fill_mask_default_model_has_no_head():
    r = run("fill-mask", "Paris is the [MASK] of France.")
    assert r.returncode == 2 and "no masked-LM head" in r.stderr and "all-MiniLM-L6-v2" in r.stderr


def test_fill_mask_on_a_masked_lm(tiny, minilm, tmp_path):
    """A tiny random BertForMaskedLM with the real MiniLM vocabulary: the printed top-1 is the argmax."""
    masked_lm(tmp_path, minilm)
    r = run("fill-mask", "--model", str(tmp_path), "--top-k", "3", "Paris is the [MASK] of France.")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert len(rows) == 3
    model, tok = minibt.from_hub(tmp_path), minibt.load_tokenizer(tmp_path)
    batch = tok(["Paris is the [MASK] of France."])
    pos = batch["input_ids"][0].tolist().index(tok.token_id("mask_token"))
    best = model(**batch).logits[0, pos].argmax().item()
    assert rows[0].split(None, 1)[1] == f"Paris is the {tok.decode([best]).strip()} of France."


def test_bench_writes_table_and_plot(tmp_path):
    """A tiny grid: every contender timed, a markdown table and a PNG written; --with takes a .py file from outside
    the checkout, and transformers' own loading bars stay quiet."""
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    r = run("bench", "--model", "minilm", "--batch", "2", "--length", "16", "--padding", "0", "0.5", "--reps", "1",
            "--backends", "sdpa,varlen,fused,auto", "--with", str(ROOT / "benchmarks" / "hf_contenders.py"),
            "--out", str(md), "--plot", str(png), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr
    table = md.read_text()
    for contender in ("minibt sdpa", "minibt varlen", "minibt fused", "minibt auto", "transformers eager",
                      "transformers sdpa"):
        assert table.count(f"| {contender} |") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "100%" in r.stderr and "2/2 points" in r.stderr                  # the progress bar reached the end
    assert "speedup vs transformers sdpa" in table
    alone = run("bench", "--model", "minilm", "--batch", "2", "--length", "16", "--padding", "0.5", "--reps", "1")
    assert alone.returncode == 0 and "speedup vs minibt sdpa" in alone.stdout and "transformers" not in alone.stdout


def test_bench_with_that_cannot_import_is_one_clear_line(tmp_path):
    """As an installed minibt sees it: the package importable, the checkout's benchmarks/ not."""
    import os
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "minibt").symlink_to(ROOT / "minibt")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-m", "minibt", "bench", "--with", "benchmarks.hf_contenders", "--reps", "1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot import benchmarks.hf_contenders" in r.stderr and "hf_contenders.py" in r.stderr
    r = run("bench", "--with", str(tmp_path / "nope.py"), cwd=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "other.py").write_text("x = 1\n")
    r = run("bench", "--with", str(tmp_path / "other.py"), cwd=tmp_path)
    assert r.returncode == 2 and "has no function 'contenders'" in r.stderr


def test_fill_mask_predicts_every_mask_like_transformers(minilm, tmp_path):
    """Two masks: each gets its own predictions, equal to transformers' fill-mask pipeline on the same weights."""
    import transformers
    folder = masked_lm(tmp_path / "mlm", minilm)
    text = "Paris is the [MASK] of [MASK]."
    want = transformers.pipeline("fill-mask", model=str(folder), top_k=3, device="cpu")(text)
    got = cli.fill_masks(minibt.from_hub(folder), minibt.load_tokenizer(folder), text, 3)
    assert len(got) == len(want) == 2
    for (j, rows), ref in zip(got, want):
        assert [w for _, w, _ in rows] == [r["token_str"].strip() for r in ref]
        for (p, _, _), r in zip(rows, ref):
            assert abs(p - r["score"]) < 1e-4
    r = run("fill-mask", "--model", str(folder), "--top-k", "3", text)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "mask 1 of 2:" and lines[4] == "mask 2 of 2:" and len(lines) == 8
    first, second = want[0][0]["token_str"].strip(), want[1][0]["token_str"].strip()
    assert lines[1].split(None, 1)[1] == f"Paris is the {first} of [MASK]."
    assert lines[5].split(None, 1)[1] == f"Paris is the [MASK] of {second}."


# ------------------------------------------------------------------------------- help, README and parser agree

def subparsers():
    p = cli.parser()
    action = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return p, action.choices


def options(sub) -> set:
    return {s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## The `minibt` command"):text.index("\n## ", text.index("## The `minibt` command") + 5)]


def test_readme_command_table_is_the_parser():
    """The README's table of commands and flags is exactly what the parser accepts, command by command."""
    _, subs = subparsers()
    table = {}
    for line in readme_section().splitlines():
        m = re.match(r"\| `minibt ([a-z-]+)` \|.*\|(.*)\|$", line)
        if m:
            table[m.group(1)] = set(re.findall(r"`(--[a-z-]+)`", m.group(2)))
    assert table.keys() == subs.keys()
    for name, sub in subs.items():
        assert table[name] == options(sub), name


def test_readme_commands_parse():
    """Every `minibt ...` command line shown in the README's command section is accepted by the parser."""
    section = readme_section()
    shown = [m.group(1) for m in re.finditer(r"^\$ minibt (.+)$", section, re.M)]
    shown += [m.group(1) for m in re.finditer(r"`minibt ((?:embed|fill-mask|generate|audit|attend-map|bench) "
                                              r"[^`|]+)`", section)]
    assert len(shown) >= 6
    p = cli.parser()
    for line in shown:
        p.parse_args(shlex.split(line.replace("\\", "")))          # SystemExit (a failure) if not accepted


def test_help_lists_the_real_commands_and_only_real_flags():
    _, subs = subparsers()
    top = run("--help")
    assert top.returncode == 0
    listed = re.findall(r"^    ([a-z-]+)", top.stdout, re.M)
    assert listed == list(subs) and "as they land" not in top.stdout
    for name, sub in subs.items():
        text = sub.format_help()
        assert set(re.findall(r"(--[a-z][a-z-]+)", text)) - {"--help"} <= options(sub), name
    assert "seed" not in subs["bench"].format_help()
    assert "default: the bundled" not in subs["generate"].format_help()


@pytest.mark.parametrize("command", ["embed", "fill-mask", "generate", "audit", "attend-map", "bench"])
def test_attn_and_dtype_are_checked_by_every_command(command, capsys):
    """Each command either validates --attn/--dtype against the registry / dtype list, or does not take them."""
    _, subs = subparsers()
    base = {"generate": ["--model", "m", "text"], "bench": []}.get(command, ["text"])
    for flag, good, bad in (("--attn", "sdpa", "nonsense"), ("--dtype", "bf16", "nonsense")):
        with pytest.raises(SystemExit) as e:
            cli.parser().parse_args([command, *base, flag, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        if flag in options(subs[command]):
            assert "invalid choice: 'nonsense'" in err
            if flag == "--attn":                                  # the names offered are the registry's
                assert all(repr(n) in err for n in minibt.attention.backends())
            cli.parser().parse_args([command, *base, flag, good])
        else:
            assert f"unrecognized arguments: {flag}" in err


@pytest.mark.parametrize("argv, what", [
    (["fill-mask", "--top-k", "0", "x"], "--top-k: must be >= 1, got 0"),
    (["generate", "--model", "m", "--top-k", "-1", "x"], "--top-k: must be >= 1"),
    (["generate", "--model", "m", "--max-new-tokens", "-5", "x"], "--max-new-tokens: must be >= 0, got -5"),
    (["generate", "--model", "m", "--top-p", "1.5", "x"], "--top-p: must be > 0 and <= 1"),
    (["generate", "--model", "m", "--sample", "--temperature", "0", "x"], "--temperature: must be > 0"),
    (["bench", "--reps", "0"], "--reps: must be >= 1"),
    (["bench", "--batch", "8", "0"], "--batch: must be >= 1"),
    (["bench", "--padding", "0.5", "1"], "--padding: must be >= 0 and < 1"),
    (["bench", "--padding", "-0.1"], "--padding: must be >= 0 and < 1"),
    (["bench", "--length", "abc"], "--length: expected an integer, got 'abc'"),
    (["bench", "--backends", "sdpa,nope"], "unknown backend 'nope'"),
    (["audit", "--backends", "nope", "x"], "unknown backend 'nope'"),
    (["embed", "--chunk", "0", "--file", "f", "--out", "o.npy"], "--chunk: must be >= 1, got 0"),
    (["embed", "--batch-tokens", "0", "x"], "--batch-tokens: must be >= 1"),
    (["attend-map", "--layer", "-1", "x"], "--layer: must be >= 0"),
])
def test_numbers_out_of_range_are_refused(argv, what, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(argv)
    assert e.value.code == 2 and what in capsys.readouterr().err


def test_help_and_version_do_not_import_torch():
    code = ("import runpy, sys\n"
            "for argv in (['--help'], ['--version']):\n"
            "    sys.argv = ['minibt', *argv]\n"
            "    try:\n"
            "        runpy.run_module('minibt', run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: minibt" in r.stdout and r.stdout.strip().endswith("torch imported: False")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert minibt.__version__ == version and f"minibt {version}" in r.stdout
    license = (ROOT / "LICENSE").read_text()
    assert license.startswith("MIT License") and "minibt authors" in license


def test_fp16_on_cpu_is_one_clean_line(minilm):
    r = run("fill-mask", "--dtype", "fp16", "Paris is the [MASK] of France.")   # loads, then: no MLM head
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0] == ("minibt: warning: float16 on CPU is about 1000x slower than bfloat16 here; use --dtype bf16")
    assert len(lines) == 2 and "Warning" not in r.stderr and "warn(" not in r.stderr


def test_audit_progress_title_and_no_matplotlib(minilm, tmp_path, monkeypatch, capsys):
    """audit: a progress bar over the backends, the renamed summary column, and without matplotlib a line saying
    the report has no plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # as if not installed
    assert cli.main(["audit", "--backends", "sdpa,varlen", "--out", str(tmp_path / "r"), "Some text."]) == 0
    out, err = capsys.readouterr()
    assert "| compared with naive in float64 (real tokens) |" in out and "| sdpa | attention and layer outputs |" in out
    assert "matplotlib is not installed: the report has no plots" in out
    assert "100%" in err and "2/2 backends" in err
    assert "no plots" in (tmp_path / "r" / "report.md").read_text()


def test_plots_name_model_and_dtype(minilm, tmp_path, monkeypatch):
    import matplotlib.axes
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **k: titles.append(t))
    assert cli.main(["audit", "--backends", "sdpa", "--dtype", "bf16", "--out", str(tmp_path / "r"), "Text."]) == 0
    assert cli.main(["attend-map", "--out", str(tmp_path / "m.png"), "Text."]) == 0
    from minibt.tools import bench
    rows = [dict(batch=1, length=8, padding=0.0, contender="minibt sdpa", speedup=1.0)]
    bench.plot(rows, tmp_path / "b.png", "minilm, bfloat16")
    assert titles[:3] == ["all-MiniLM-L6-v2 (bundled), bfloat16"] * 3                   # errors, time, memory
    assert titles[3] == "all-MiniLM-L6-v2 (bundled), float32: layer 0, head 0" and titles[4] == "minilm, bfloat16"


def test_attention_map_labels_are_decoded(minilm, smollm2):
    from minibt.tools.attention_map import token_labels
    tok = minibt.load_tokenizer(smollm2)
    ids = tok(["The cat is sleeping"])["input_ids"][0].tolist()
    labels = token_labels(tok, ids)
    assert "cat" in labels and not any("Ġ" in t for t in labels)
    assert any("Ġ" in t for t in tok.convert_ids_to_tokens(ids))              # the raw pieces were byte-level
    tok = minibt.load_tokenizer(minilm)
    ids = tok(["unbelievably"])["input_ids"][0].tolist()
    labels = token_labels(tok, ids)
    assert labels[0] == "[CLS]" and labels[-1] == "[SEP]" and any(t.startswith("##") for t in labels[1:-1])
    assert labels == tok.convert_ids_to_tokens(ids)                          # WordPiece pieces are already readable


def test_progress_bar_line():
    import io
    from minibt.tools.progress import Progress
    out = io.StringIO()
    bar = Progress(8, "lines", stream=out, every=0)
    for _ in range(4):
        bar.update(2)
    text = out.getvalue()
    assert "50%" in text and "4/8 lines" in text and "100%" in text and "8/8 lines" in text and "lines/s" in text
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", text)                            # elapsed < ETA
    out = io.StringIO()
    bar = Progress(None, "lines", stream=out, every=0)
    bar.update(3)
    assert "3 lines" in out.getvalue() and "%" not in out.getvalue()


def test_python_m_minibt_and_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"minibt {minibt.__version__}"


def test_version_falls_back_to_pyproject(monkeypatch):
    """A plain checkout on sys.path, with no installed metadata: the version comes from pyproject.toml."""
    import importlib.metadata

    asked = []

    def missing(name):
        asked.append(name)
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert minibt.__version__ == version and asked == ["minibt"]


def test_attend_map_draws_each_variants_mask(tmp_path):
    """attend-map --masks: one PNG per attention variant, from minibt's own AttnMask."""
    out = run("attend-map", "--masks", str(tmp_path))
    assert out.returncode == 0, out.stderr
    names = {"causal", "window-causal", "window-bidirectional", "local-global", "alibi", "relative"}
    assert {p.name for p in tmp_path.iterdir()} == {f"mask-{n}.png" for n in names}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------- the first hour, round 2 (issue 27)

def test_argument_errors_are_one_line(capsys):
    """Not argparse's usage block: one line naming the argument, exit 2."""
    for argv, what in ((["embed", "--batch-tokens", "x"], "argument --batch-tokens: expected an integer, got 'x'"),
                       (["nope"], "invalid choice: 'nope'"), (["embed", "--nope"], "unrecognized arguments: --nope")):
        with pytest.raises(SystemExit) as e:
            cli.parser().parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("minibt: error: ") and what in err, err
        assert "usage:" not in err


def test_no_command_prints_help_and_exits_0(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minibt") and all(c.name in out for c in cli.COMMANDS)


def test_every_flag_has_help_and_shows_its_default():
    _, subs = subparsers()
    for name, sub in subs.items():
        for a in sub._actions:
            if a.dest == "help":
                continue
            assert a.help, f"{name} {a.option_strings or a.dest}: no help"
            if a.option_strings and a.default not in (None, False):
                text = cli._Help(name)._get_help_string(a)        # as printed, before %(default)s is filled in
                values = a.default if isinstance(a.default, list) else [a.default]
                shown = {" ".join(map(str, values)), ",".join(map(str, values))}
                assert "%(default)s" in text or any(f"default{sep}{v}" in text for v in shown for sep in (": ", " ")), \
                    (name, a.option_strings, text)


def test_sampling_flags_without_sample_are_refused(capsys):
    """Before the model loads ('m' does not exist): greedy decoding would silently ignore them."""
    for flag, value in (("--temperature", "0.5"), ("--top-p", "0.9"), ("--seed", "3")):
        assert cli.main(["generate", "--model", "m", flag, value, "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"minibt: error: {flag} only apply with --sample") and err.count("\n") == 1


def test_fill_mask_checks_every_text_before_printing(minilm, tmp_path, capsys):
    folder = masked_lm(tmp_path / "mlm", minilm)
    assert cli.main(["fill-mask", "--model", str(folder), "Paris is the [MASK] of France.", "no mask here"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no [MASK] token in 'no mask here'" in captured.err


def test_int4_on_an_encoder_warns_with_the_measured_risk(minilm, capsys):
    assert cli.main(["embed", "--quantize", "int4", "a cat", "a dog"]) == 0
    assert "min cosine of 0.918" in capsys.readouterr().err


def test_bench_with_imports_from_the_current_folder(tmp_path, monkeypatch):
    """`minibt bench --with benchmarks.hf_contenders` from a checkout: the console script's sys.path does not hold the
    current folder; load_contenders looks there, as `python -m` would, and leaves sys.path as it was."""
    from minibt.tools import bench
    (tmp_path / "mybench").mkdir()
    (tmp_path / "mybench" / "__init__.py").write_text("")
    (tmp_path / "mybench" / "contenders_x.py").write_text("def contenders(shape, dtype):\n    return None, {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    fn = bench.load_contenders("mybench.contenders_x")
    assert fn("bert-base", None) == (None, {}) and sys.path == before


def test_readme_install_block_puts_the_cpu_index_first():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```bash", text.index("## Install and test")):]
    block = block[:block.index("```", 7)]
    lines = block.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if line.startswith("pip install torch=="))
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    assert torch_line < next(i for i, line in enumerate(lines) if line.startswith("pip install -e "))
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "python tests/smollm2_fixture.py" in text


def test_smollm2_fixture_is_one_command(tmp_path):
    """`python tests/smollm2_fixture.py` prints the folder (built once; here an already built one is found)."""
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    r = subprocess.run([sys.executable, "tests/smollm2_fixture.py"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**__import__("os").environ, "MINIBT_TEST_CACHE": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip() == str(folder), r.stderr
