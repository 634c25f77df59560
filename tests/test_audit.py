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
