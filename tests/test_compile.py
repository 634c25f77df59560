"""torch.compile of the dense half-layers: same numbers as eager, and new shapes do not recompile."""
import torch

import minibt
from conftest import ragged_batch


def test_compiled_layers_match_naive_and_do_not_recompile(tiny):
    from torch._dynamo.utils import counters
    folder, _ = tiny("BertModel")
    spec = minibt.from_hub(folder, attn="naive")
    model = minibt.from_hub(folder, compile=True)
    for attn in ("sdpa", "varlen", "naive"):
        model.set_attention(attn)
        for lengths in ((9, 5, 1, 0), (12, 3), (7, 7, 7, 7, 2)):
            ids, mask = ragged_batch(99, 0, lengths)
            with torch.no_grad():
                got = model(ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got, spec(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=0)
    # two functions (project, finish), dynamic shapes: a handful of graphs, not one per call or per layer
    # 2 functions x 2 layers x 3 backends x 3 shapes would be 36 graphs if anything recompiled per call or layer
    assert 0 < counters["stats"]["unique_graphs"] <= 8
