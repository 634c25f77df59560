"""Issue 27, the file boundaries: JSON bombs, quantized folders, hub snapshot links, `embed --file` inputs and outputs,
checkpoint semantics and the CLI's image/report outputs. Each case asserts the error type, that the message names
the fault, and where it matters that nothing outside the folder was written (docs/reliability.md)."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minibt
from minibt import config as config_module
from minibt.errors import CheckpointError, ConfigError, InputError
from minibt.kernels.quantize import QUANTIZED_FILE, QuantizeError, save_quantized
from minibt.tools import cli
from minibt.tools import embed_file as ef
from test_loading import copy, edit_config
from test_quantize import _edit, _tiny_llama

BOMB = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
TOO_DEEP = "nested deeper than the limit of 64 levels"


@pytest.fixture(scope="module")
def bert_folder(tiny):
    return tiny("BertModel")[0]


@pytest.fixture(scope="module")
def fp_llama(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("fp") / "fp", tie_word_embeddings=True)


def quantized(fp, folder, scheme="int8"):
    return save_quantized(minibt.from_hub(fp, quantize=scheme), folder)


# ------------------------------------------------------------------------------------------------ JSON bombs

def test_json_limits_in_the_one_parser(monkeypatch):
    for raw in (BOMB, b"[" * 65 + b"]" * 65):
        with pytest.raises(ConfigError, match=f"where.json: JSON {TOO_DEEP}"):
            config_module.loads(raw, "where.json")
    assert config_module.loads(b"[" * 64 + b"]" * 64, "ok.json", kind=list)      # the limit itself is allowed
    monkeypatch.setattr(config_module, "MAX_JSON_BYTES", 100)
    with pytest.raises(CheckpointError, match="big.json: 101 bytes of JSON, over the 100-byte limit"):
        config_module.loads(b" " * 99 + b"{}", "big.json", error=CheckpointError)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "model.safetensors"])
def test_json_bombs_in_a_model_folder(bert_folder, tmp_path, name):
    folder = copy(bert_folder, tmp_path)
    if name == "model.safetensors.index.json":
        (folder / "model.safetensors").unlink()
        (folder / name).write_bytes(BOMB)
    elif name == "model.safetensors":
        (folder / name).write_bytes(len(BOMB).to_bytes(8, "little") + BOMB)
    else:
        (folder / name).write_bytes(BOMB)
    error = ConfigError if name == "config.json" else CheckpointError
    with pytest.raises(error, match=f"{name}.*{TOO_DEEP}") as e:
        minibt.from_hub(folder)
    assert str(folder / name) in str(e.value)


def test_json_bombs_in_generation_and_tokenizer_configs(tiny_decoder, minilm, tmp_path):
    folder = copy(tiny_decoder("llama-gqa")[0], tmp_path, "decoder")
    (folder / "generation_config.json").write_bytes(BOMB)
    with pytest.raises(ConfigError, match=f"generation_config.json: JSON {TOO_DEEP}"):
        minibt.from_hub(folder)
    folder = copy(minilm, tmp_path, "minilm")
    (folder / "tokenizer_config.json").write_bytes(BOMB)
    with pytest.raises(ConfigError, match=f"tokenizer_config.json: JSON {TOO_DEEP}"):
        minibt.load_tokenizer(folder)


def test_quantization_manifest_bomb_and_not_an_object(fp_llama, tmp_path):
    out = quantized(fp_llama, tmp_path / "q")
    from safetensors import safe_open
    path = out / QUANTIZED_FILE
    tensors = load_file(path)
    save_file(tensors, path, metadata={"minibt": BOMB.decode()})
    with pytest.raises(QuantizeError, match=f"manifest .*{TOO_DEEP}"):
        minibt.from_hub(out)
    save_file(tensors, path, metadata={"minibt": "[1, 2]"})
    with pytest.raises(QuantizeError, match="manifest .*must hold a JSON object, got list"):
        minibt.from_hub(out)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["minibt"] == "[1, 2]"


def test_header_shape_that_overflows_is_a_checkpoint_error(bert_folder, tmp_path):
    folder = copy(bert_folder, tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [0, 2**62, 4], "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"tensor 'w': shape \[0, 4611686018427387904, 4\] overflows"):
        minibt.from_hub(folder)


# ------------------------------------------------------------------------------------------------ hub snapshots

def snapshot(tmp_path, source: Path) -> Path:
    """A hub-cache layout: files in blobs/, the snapshot's entries links to them (as huggingface_hub makes them)."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in source.rglob("*"):
        if f.is_file():
            name = f.relative_to(source)
            blob = str(name).replace("/", "--")
            shutil.copy(f, repo / "blobs" / blob)
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(*[".."] * len(name.parts), "..", "blobs", blob), snap / name)
    return snap


def test_snapshot_links_into_blobs_load_but_links_through_the_parent_folder_are_refused(minilm, tmp_path):
    snap = snapshot(tmp_path, minilm)
    reference = minibt.load_tokenizer(minilm)(["a cat"])["input_ids"]
    assert torch.equal(minibt.load_tokenizer(snap)(["a cat"])["input_ids"], reference)   # blobs: allowed
    assert minibt.from_hub(snap).config.num_layers == 6
    # a vocabulary planted beside the snapshots (inside the repo folder, outside the snapshot and its blobs)
    planted = snap.parent.parent / "planted-vocab.txt"
    planted.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nsecret\n")
    for name in ("tokenizer.json", "vocab.txt"):
        (snap / name).unlink()
    os.symlink("../../planted-vocab.txt", snap / "vocab.txt")
    with pytest.raises(CheckpointError, match=r"vocab.txt.*resolves to .*planted-vocab.txt, outside the model "
                                              r"folder .* and its repo blobs; refused"):
        minibt.load_tokenizer(snap)
    # the same through another snapshot of the repo
    other = snap.parent / ("b" * 40)
    other.mkdir()
    shutil.copy(minilm / "config.json", other / "config.json")
    (snap / "config.json").unlink()
    os.symlink(f"../{'b' * 40}/config.json", snap / "config.json")
    with pytest.raises(CheckpointError, match="config.json.*outside the model folder"):
        minibt.from_hub(snap)


def test_quantized_folder_links_leading_outside_are_refused(fp_llama, tmp_path):
    out = quantized(fp_llama, tmp_path / "q")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(out / QUANTIZED_FILE, outside / QUANTIZED_FILE)
    os.symlink(outside / QUANTIZED_FILE, out / QUANTIZED_FILE)
    with pytest.raises(CheckpointError, match=f"{QUANTIZED_FILE}.*resolves to {outside}.*outside the model folder"):
        minibt.from_hub(out)
    os.unlink(out / QUANTIZED_FILE)
    shutil.move(outside / QUANTIZED_FILE, out / QUANTIZED_FILE)
    shutil.move(out / "config.json", outside / "config.json")
    os.symlink(outside / "config.json", out / "config.json")
    with pytest.raises(CheckpointError, match="config.json.*outside the model folder"):
        minibt.from_hub(out)


# ------------------------------------------------------------------------------------------------ quantized folders

def test_save_quantized_never_overwrites_another_models_folder(fp_llama, bert_folder, tmp_path):
    other = copy(bert_folder, tmp_path, "other")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(QuantizeError, match=f"{other} already holds config.json, model.safetensors.*refused.*"
                                            "config.json would be overwritten"):
        quantized(fp_llama, other)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before              # nothing written
    assert minibt.from_hub(other).family == "bert"
    # a quantized folder of the same model is overwritten (another scheme); one of another model is refused
    out = quantized(fp_llama, tmp_path / "q", "int8")
    assert quantized(fp_llama, out, "int4") == out and minibt.from_hub(out).quantization["scheme"] == "int4"
    edit_config(out, rms_norm_eps=1e-3)
    with pytest.raises(QuantizeError, match="not a quantized folder of this model"):
        quantized(fp_llama, out)


def test_save_quantized_never_writes_through_a_planted_link(fp_llama, tmp_path):
    out = quantized(fp_llama, tmp_path / "q")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    (out / QUANTIZED_FILE).unlink()
    os.symlink(victim, out / QUANTIZED_FILE)                  # a link where the quantized file goes
    with pytest.raises(QuantizeError, match=f"{QUANTIZED_FILE} is a symbolic link; refused"):
        quantized(fp_llama, out)
    assert victim.read_bytes() == b"keep me"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]                 # no temporary left behind


@pytest.mark.parametrize("scheme,tensor,value", [("int8", "layers.0.mlp.down.scale", float("nan")),
                                                 ("int8", "layers.1.attention.qkv.scale", -1.0),
                                                 ("int4", "layers.0.mlp.down.scale_zero", float("inf"))])
def test_tampered_scales_are_refused_by_name(fp_llama, tmp_path, scheme, tensor, value):
    out = quantized(fp_llama, tmp_path / "q", scheme)
    def tamper(t):
        t[tensor] = t[tensor].clone()
        t[tensor].view(-1)[0] = value
    _edit(out / QUANTIZED_FILE, change_tensors=tamper)
    with pytest.raises(QuantizeError, match=f"tensor '{tensor}' holds 1 scale value.*first: .*{value}"):
        minibt.from_hub(out)


def test_a_quantized_file_beside_a_full_checkpoint_loses_to_it(fp_llama, tmp_path):
    """The rule: a folder holding model.safetensors (or an index) loads its full checkpoint, as transformers does;
    the quantized file beside it is ignored, with a warning naming it."""
    out = quantized(fp_llama, tmp_path / "q")
    folder = copy(fp_llama, tmp_path, "both")
    shutil.copy(out / QUANTIZED_FILE, folder / QUANTIZED_FILE)
    with pytest.warns(UserWarning, match=f"{QUANTIZED_FILE}: loading the full checkpoint"):
        model = minibt.from_hub(folder)
    assert not getattr(model, "quantization", None)
    full = minibt.from_hub(fp_llama)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), full.state_dict().values()))
    with pytest.warns(UserWarning):
        assert minibt.from_hub(folder, quantize="int4").quantization["scheme"] == "int4"   # from the full weights


# ------------------------------------------------------------------------------------------------ embed --file

def lines_file(path, n=40):
    path.write_text("".join(f"line {i} about cats and dogs\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def mini(minilm):
    return minibt.from_hub(minilm), minibt.load_tokenizer(minilm)


def test_a_fifo_is_streamed_line_by_line(mini, tmp_path):
    model, tok = mini
    src = lines_file(tmp_path / "c.txt")
    ef.embed_file(model, tok, str(src), tmp_path / "file.npy", progress=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(src.read_bytes()))
    writer.start()
    assert ef.embed_file(model, tok, str(fifo), tmp_path / "fifo.npy", progress=False, chunk=7) == 40
    writer.join()
    a, b = np.load(tmp_path / "file.npy"), np.load(tmp_path / "fifo.npy")
    assert a.shape == b.shape == (40, 384) and np.allclose(a, b, atol=1e-6)


def test_a_line_over_the_limit_is_refused_by_file_line_and_limit(mini, minilm, tmp_path, capsys):
    """One input line of more than MAX_LINE_BYTES is refused (InputError naming the file, the line number and the
    limit); the rows before it stay committed, and --resume after fixing the line gives the whole file."""
    import io
    from minibt.tools.lines import MAX_LINE_BYTES, Lines
    limit = str(MAX_LINE_BYTES)
    exact = Lines(io.BytesIO(b"x" * MAX_LINE_BYTES + b"\nlast"), name="exact")          # the limit itself: a line
    assert [len(t) for t in exact.take(5)] == [MAX_LINE_BYTES, 4]
    with pytest.raises(InputError, match=f"^unterminated line 1: longer than {limit} bytes"):
        Lines(io.BytesIO(b"x" * (MAX_LINE_BYTES + 1)), name="unterminated").take(5)     # a last line without \n too
    src = tmp_path / "c.txt"
    good = [f"line {i} about cats" for i in range(8)]
    long = ("cats " * (MAX_LINE_BYTES // 5 + 1))[:MAX_LINE_BYTES + 1]                   # just over the limit
    assert len(long) == MAX_LINE_BYTES + 1
    src.write_text("\n".join(good[:5] + [long] + good[6:]) + "\n")
    out = tmp_path / "v.npy"
    argv = ["embed", "--model", str(minilm), "--file", str(src), "--out", str(out), "--chunk", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{src} line 6: longer than {limit} bytes, the limit on one line" in err
    assert json.loads((tmp_path / "v.npy.progress").read_text())["rows"] == 4     # lines 1-4: safely on disk
    src.write_text("\n".join(good) + "\n")
    assert cli.main([*argv, "--resume"]) == 0
    model, tok = mini
    want = minibt.embed(model, tok, good).numpy()
    assert np.abs(np.load(out) - want).max() < 1e-5


def test_an_over_long_line_from_a_fifo_is_refused_without_reading_it_all(mini, tmp_path):
    """A pipe cannot be counted first: the reader stops at the limit, and the writer's 8 MiB line is never drained."""
    from minibt.tools.lines import MAX_LINE_BYTES
    model, tok = mini
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sent = {"bytes": 0}

    def write():
        try:
            with open(fifo, "wb", buffering=0) as f:
                f.write(b"first line\n")
                for _ in range(128):                                    # one 8 MiB line, 64 KiB at a time
                    sent["bytes"] += f.write(b"y" * (64 << 10))
                f.write(b"\n")
        except BrokenPipeError:
            pass                                                        # the reader refused and closed the pipe
    writer = threading.Thread(target=write)
    writer.start()
    with pytest.raises(InputError, match=f"{fifo} line 2: longer than {MAX_LINE_BYTES} bytes"):
        ef.embed_file(model, tok, str(fifo), tmp_path / "v.npy", progress=False)
    writer.join(timeout=60)
    assert not writer.is_alive() and sent["bytes"] < 2 * MAX_LINE_BYTES


def test_process_substitution_is_streamed(minilm, tmp_path):
    src = lines_file(tmp_path / "c.txt", 12)
    out = tmp_path / "v.jsonl"
    p = subprocess.run(["bash", "-c", f'"{sys.executable}" -m minibt.tools.cli embed --model "{minilm}" '
                                      f'--file <(cat "{src}") --out "{out}"'],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(12)) and all(len(r["vector"]) == 384 for r in rows)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_is_refused_by_name(mini, tmp_path, monkeypatch, device):
    model, tok = mini
    with pytest.raises(InputError, match=f"--file {device} is a character device, not a file of lines; refused"):
        ef.embed_file(model, tok, device, tmp_path / "v.npy", progress=False)
    with open(device, "rb") as stdin:                    # the same device on stdin
        monkeypatch.setattr(sys, "stdin", stdin)
        with pytest.raises(InputError, match="--file <stdin> is a character device"):
            ef.embed_file(model, tok, "-", tmp_path / "v.npy", progress=False)
    assert not (tmp_path / "v.npy").exists()
    with pytest.raises(InputError, match=f"cannot read {tmp_path}"):                 # a folder
        ef.embed_file(model, tok, str(tmp_path), tmp_path / "v.npy", progress=False)


def test_outputs_never_follow_planted_links(mini, tmp_path):
    model, tok = mini
    src = lines_file(tmp_path / "c.txt", 5)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # the old fixed temporary name of the progress record: not used any more (temporaries are random, exclusive)
    os.symlink(victim, out_dir / "v.npy.progress.tmp")
    assert ef.embed_file(model, tok, str(src), out_dir / "v.npy", progress=False, chunk=2) == 5
    assert victim.read_text() == "keep me" and np.load(out_dir / "v.npy").shape == (5, 384)
    # a link at the progress record itself, and one (dangling) at the output
    os.symlink(victim, out_dir / "w.npy.progress")
    with pytest.raises(InputError, match=r"progress record .*w\.npy\.progress is a symbolic link; refused"):
        ef.embed_file(model, tok, str(src), out_dir / "w.npy", progress=False)
    os.symlink(tmp_path / "created-elsewhere.npy", out_dir / "x.npy")
    with pytest.raises(InputError, match=r"output .*x\.npy is a symbolic link; refused"):
        ef.embed_file(model, tok, str(src), out_dir / "x.npy", progress=False)
    assert victim.read_text() == "keep me" and not (tmp_path / "created-elsewhere.npy").exists()


def test_a_deeply_nested_progress_record_is_an_input_error(mini, tmp_path):
    model, tok = mini
    src = lines_file(tmp_path / "c.txt", 5)
    out = tmp_path / "v.npy"
    out.write_bytes(b"")
    (tmp_path / "v.npy.progress").write_bytes(BOMB)
    with pytest.raises(InputError, match=rf"v\.npy\.progress: JSON {TOO_DEEP}"):
        ef.embed_file(model, tok, str(src), out, resume=True, progress=False)


# ------------------------------------------------------------------------------------------------ checkpoint semantics

def test_single_file_wins_over_an_index_as_in_transformers(bert_folder, tmp_path):
    import transformers
    folder = copy(bert_folder, tmp_path)
    sd = load_file(folder / "model.safetensors")
    keys = sorted(sd)
    save_file({k: sd[k] + 1.0 if sd[k].is_floating_point() else sd[k] for k in keys},
              folder / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    ref = transformers.AutoModel.from_pretrained(folder).eval()
    ids = torch.randint(3, 99, (2, 7))
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = minibt.from_hub(folder)(ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_bert_with_is_decoder_is_refused(bert_folder, tmp_path):
    folder = copy(bert_folder, tmp_path)
    edit_config(folder, is_decoder=True)
    with pytest.raises(ConfigError, match="config.json: is_decoder = true asks bert for causal"):
        minibt.from_hub(folder)
    edit_config(folder, is_decoder="yes")
    with pytest.raises(ConfigError, match="'is_decoder' = 'yes' must be true or false"):
        minibt.from_hub(folder)


def test_a_config_asking_for_more_layers_than_the_checkpoint_is_refused_before_building(bert_folder, tmp_path,
                                                                                       monkeypatch):
    folder = copy(bert_folder, tmp_path)
    edit_config(folder, num_hidden_layers=100_000)
    from minibt.models import bert
    built = []
    monkeypatch.setattr(bert.EncoderLayer, "__init__", lambda self, *a, **k: built.append(1) or 1 / 0)
    with pytest.raises(CheckpointError, match="asks for 100000 layers, but the checkpoint .* holds weights for 2"):
        minibt.from_hub(folder)
    assert not built                                                          # not one layer was built


def test_roberta_pad_id_beyond_its_positions_names_both_fields(tiny, tmp_path):
    folder = copy(tiny("RobertaModel")[0], tmp_path)
    edit_config(folder, pad_token_id=600)
    with pytest.raises(ConfigError, match="pad_token_id = 600 leaves no positions.*max_position_embeddings = 66"):
        minibt.from_hub(folder)


# ------------------------------------------------------------------------------------------------ CLI outputs

def test_attend_map_and_audit_out_errors_are_one_line(minilm, tmp_path, capsys):
    model = ["--model", str(minilm)]
    cases = [(["attend-map", *model, "--out", str(tmp_path / "missing" / "m.png"), "Text."],
              f"the folder {tmp_path / 'missing'} does not exist"),
             (["attend-map", *model, "--out", str(tmp_path / "m.xyz"), "Text."], "extension '.xyz' is not an image"),
             (["attend-map", *model, "--out", str(tmp_path / "m"), "Text."], "extension '(none)' is not an image"),
             (["audit", *model, "--backends", "sdpa", "--out", str(tmp_path / "missing" / "r"), "Text."],
              f"the folder {tmp_path / 'missing'} does not exist")]
    for argv, words in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("minibt: error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "m.xyz").exists()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    os.symlink(victim, tmp_path / "link.png")
    assert cli.main(["attend-map", *model, "--out", str(tmp_path / "link.png"), "Text."]) == 2
    assert "link.png is a symbolic link; refused" in capsys.readouterr().err and victim.read_bytes() == b"keep me"
    (tmp_path / "afile").write_text("x")
    assert cli.main(["audit", *model, "--backends", "sdpa", "--out", str(tmp_path / "afile"), "Text."]) == 2
    assert "afile is not a folder" in capsys.readouterr().err
