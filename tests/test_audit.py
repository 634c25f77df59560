"""minibt.audit catches a broken backend at the right layer; attention maps are written."""
import pytest
import torch

import minibt
from minibt import attention
from minibt.kernels.fused_encoder import FusedEncoder
from conftest import left_padded, ragged_batch


@pytest.fixture
def broken_from_layer_1():
    """Right in layer 0, off by 1% from layer 1 on (the tiny models have 2 layers)."""
    calls = {"n": 0}

    def broken(q, k, v, *, mask, scale):
        layer = calls["n"] % 2
        calls["n"] += 1
        out = attention.naive(q, k, v, mask=mask, scale=scale)
        return out * 1.01 if layer >= 1 else out
    attention.register("broken-test", broken)
    yield "broken-test"
    attention._REGISTRY.pop("broken-test")


def test_audit_flags_the_first_bad_layer(tiny, broken_from_layer_1, tmp_path):
    folder, _ = tiny("BertModel")
    model = minibt.from_hub(folder, attn="fused")
    ids, mask = ragged_batch(99, 0)
    result = minibt.audit(model, {"input_ids": ids, "attention_mask": mask},
                          ["sdpa", "varlen", "tiled", broken_from_layer_1], out_dir=tmp_path / "report")
    assert result.summary[broken_from_layer_1]["first_bad_layer"] == 1
    for good in ("sdpa", "varlen", "tiled"):
        assert result.summary[good]["first_bad_layer"] is None and result.summary[good]["max_rel"] < 1e-5
    rows = {(r["backend"], r["layer"]): r for r in result.rows}
    assert rows[(broken_from_layer_1, 0)]["attn_rel"] < 1e-5 < rows[(broken_from_layer_1, 1)]["attn_rel"]
    assert model.attn == "fused" and isinstance(model.layers, FusedEncoder)           # the model's own backend is restored
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| broken-test |" in report and "first layer out of tolerance" in report
    for png in ("errors.png", "time.png", "memory.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["RobertaModel", "DistilBertModel", "opt-pre-ln", "llama-gqa"])
def test_audit_runs_on_every_family(tiny, tiny_decoder, kind):
    folder, _ = tiny(kind) if kind[0].isupper() else tiny_decoder(kind)
    model = minibt.from_hub(folder)
    ids, mask = (ragged_batch if kind[0].isupper() else left_padded)(99, 1, (9, 5, 2))
    result = minibt.audit(model, {"input_ids": ids, "attention_mask": mask}, ["sdpa", "varlen", "flash", "tiled"],
                          repeats=1)
    assert all(s["first_bad_layer"] is None for s in result.summary.values())
    assert len(result.rows) == 4 * 2


def test_attention_map_png(minilm, tmp_path):
    from minibt.tools.attention_map import attention_map, attention_probs
    model, tok = minibt.from_hub(minilm), minibt.load_tokenizer(minilm)
    tokens, probs = attention_probs(model, tok, "Paris is lovely.", layer=2, head=3)
    assert tokens[0] == "[CLS]" and probs.shape == (len(tokens), len(tokens))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(tokens)))
    path = attention_map(model, tok, "Paris is lovely.", 2, 3, tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(minibt.errors.InputError, match="6 layers"):
        attention_probs(model, tok, "x", layer=6, head=0)


# ------------------------------------------------- auto and fused (issue 27, first hour round 2)

def test_audit_compares_auto_and_fused_on_what_they_expose(tiny):
    """auto: each layer's output (no attention trace), naming the function it ran; fused: the last layer's output
    (one call for the stack). Both within fp32's tolerance of naive in float64, and the table says what was compared."""
    folder, _ = tiny("BertModel")
    model = minibt.from_hub(folder)
    ids, mask = ragged_batch(99, 0)
    result = minibt.audit(model, {"input_ids": ids, "attention_mask": mask}, ["fused", "auto", "sdpa"], repeats=1)
    assert set(result.summary) == {"fused", "auto", "sdpa"} and not result.refused
    by = lambda name: [r for r in result.rows if r["backend"] == name]
    assert [r["layer"] for r in by("fused")] == [len(model.layers) - 1]
    assert [r["layer"] for r in by("auto")] == list(range(len(model.layers)))
    assert all(r["attn_rel"] is None for r in by("fused") + by("auto"))
    assert all(r["attn_rel"] is not None for r in by("sdpa"))
    for name in ("fused", "auto"):
        s = result.summary[name]
        assert s["first_bad_layer"] is None and 0 < s["max_rel"] < 1e-5, (name, s)
    assert result.summary["auto"]["compared"] == "layer outputs (auto ran varlen)"    # the batch is padded
    table = result.table()
    assert "| fused | last layer output |" in table and "| auto | layer outputs (auto ran varlen) |" in table
    assert "| sdpa | attention and layer outputs |" in table and "| auto | 0 | n/a | n/a |" in table
    assert model.attn == "auto" and not isinstance(model.layers, FusedEncoder)        # restored


def test_audit_catches_a_wrong_fused_stack_and_a_wrong_pick_of_auto(tiny, monkeypatch):
    folder, _ = tiny("BertModel")
    model = minibt.from_hub(folder)
    ids, mask = ragged_batch(99, 0)
    forward = FusedEncoder.forward
    monkeypatch.setattr(FusedEncoder, "forward", lambda self, x, batch: (forward(self, x, batch)[0] * 1.01, None))
    varlen = attention.get("varlen")                               # what auto picks for this padded batch
    monkeypatch.setitem(attention._REGISTRY, "varlen", attention.Backend(
        "varlen", lambda q, k, v, *, mask, scale: varlen.fn(q, k, v, mask=mask, scale=scale) * 1.01, packed=True,
        variants=varlen.variants))
    result = minibt.audit(model, {"input_ids": ids, "attention_mask": mask}, ["fused", "auto"], repeats=1)
    assert result.summary["fused"]["first_bad_layer"] == len(model.layers) - 1
    assert result.summary["auto"]["first_bad_layer"] == 0 and result.summary["auto"]["max_rel"] > result.tolerance


@pytest.mark.parametrize("kind, why", [("llama-gqa", "is a decoder"), ("ModernBertModel", "needs window"),
                                       ("gelu_new", "hidden_act='gelu_new'")])
def test_audit_refuses_fused_by_name_where_it_cannot_run(tiny, tiny_decoder, kind, why):
    if kind == "llama-gqa":
        folder, _ = tiny_decoder(kind)
        ids, mask = left_padded(99, 1)
    else:
        folder, _ = tiny("BertModel", hidden_act="gelu_new") if kind == "gelu_new" else tiny(kind)
        ids, mask = ragged_batch(99, 0)
    model = minibt.from_hub(folder)
    done = []
    result = minibt.audit(model, {"input_ids": ids, "attention_mask": mask}, ["fused", "auto"], repeats=1,
                          progress=done.append)
    assert why in result.refused["fused"] and "fused" not in result.summary
    assert "| fused | refused: " in result.table() and why in result.table()
    assert result.summary["auto"]["first_bad_layer"] is None and done == ["fused", "auto"]
    assert not any(r["backend"] == "fused" for r in result.rows)


def test_audit_unknown_backend_is_named(tiny):
    folder, _ = tiny("BertModel")
    ids, mask = ragged_batch(99, 0)
    with pytest.raises(minibt.errors.BackendError, match="'nope'"):
        minibt.audit(minibt.from_hub(folder), {"input_ids": ids, "attention_mask": mask}, ["sdpa", "nope"])


def test_cli_audit_fused_and_auto(minilm, capsys):
    from minibt.tools import cli
    assert cli.main(["audit", "--backends", "fused,auto", "A man is eating food.", "Hi."]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "| last layer output |" in rows["fused"] and rows["fused"].endswith("| none |")
    assert "| layer outputs (auto ran " in rows["auto"] and rows["auto"].endswith("| none |")
    for name in minibt.attention.backends():                   # every name the parser offers, audit accepts
        assert cli.parser().parse_args(["audit", "--backends", name, "x"]).backends == [name]


# ------------------------------------------------------------------ --quantize int8 (issue 27)

def _cells(table: str):
    """The markdown rows of a table as lists of cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_audit_on_an_int8_model_uses_the_quantized_tolerance(tiny):
    from minibt.tools.audit import QUANTIZED_TOLERANCE, audit_quantized
    folder, _ = tiny("BertModel", intermediate_size=64)
    fp, q8 = minibt.from_hub(folder), minibt.from_hub(folder, quantize="int8")
    ids, mask = ragged_batch(99, 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    result = minibt.audit(q8, inputs, ["sdpa", "varlen", "auto"], repeats=1)
    assert result.quantized == "int8" and result.tolerance == QUANTIZED_TOLERANCE > 1e-5
    assert all(s["first_bad_layer"] is None for s in result.summary.values())
    assert max(s["max_rel"] for s in result.summary.values()) > 1e-5          # the fp32 tolerance would fail it
    assert "first layer out of tolerance (3e-02; int8 linears compute in bf16)" in result.table()
    assert minibt.audit(fp, inputs, ["sdpa"], repeats=1).tolerance == 1e-5     # float weights: unchanged
    drift = audit_quantized(fp, q8, inputs).table()
    assert "Quantization error: int8 weights against the full-precision model, both on sdpa" in drift
    rows = _cells(drift)
    assert rows[0] == ["layer", "hidden max abs", "hidden max rel", "min cosine per token"]
    assert len(rows) == len(fp.layers) + 2 and all(len(r) == 4 and all(r) for r in rows)     # no empty column


def test_cli_audit_quantize_int8(minilm, capsys):
    from minibt.tools import cli
    assert cli.main(["audit", "--quantize", "int8", "--backends", "sdpa,varlen", "A man is eating food.",
                     "Attention is all you need."]) == 0
    out = capsys.readouterr().out
    backends, drift = out.split("Quantization error:")
    rows = _cells(backends)
    assert "3e-02; int8 linears compute in bf16" in rows[0][-1]
    assert [r[0] for r in rows[1:]] == ["sdpa", "varlen"] and all(r[-1] == "none" for r in rows[1:])
    rows = _cells(drift)
    assert len(rows) == 6 + 2 and all(len(r) == 4 and all(r) for r in rows)               # 6 layers + output
    assert 0 < float(rows[-1][2]) < 0.05 and float(rows[-1][3]) > 0.99
