"""Bad inputs get a MinibtError subclass whose message names the shape, id or limit at fault."""
import pytest
import torch

import minibt
from minibt.errors import BackendError, InputError, MinibtError


@pytest.fixture(scope="module")
def bert(tiny):
    return minibt.from_hub(tiny("BertModel")[0], attn="sdpa")


def test_all_errors_share_a_base():
    for cls in (minibt.errors.CheckpointError, minibt.errors.ConfigError, InputError, BackendError):
        assert issubclass(cls, MinibtError)


def test_sequence_too_long(bert):
    with pytest.raises(InputError, match="sequence length 65 exceeds .* 64 positions"):
        bert(torch.ones(1, 65, dtype=torch.long))


def test_token_id_outside_vocabulary(bert):
    with pytest.raises(InputError, match="token id 99 .*vocab_size=99"):
        bert(torch.tensor([[5, 99, 7]]))
    with pytest.raises(InputError, match="token id -1"):
        bert(torch.tensor([[5, -1, 7]]))


def test_mask_shape_mismatch(bert):
    with pytest.raises(InputError, match=r"attention_mask shape \(2, 4\) .* \(2, 5\)"):
        bert(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match=r"\(batch, sequence\)"):
        bert(torch.ones(5, dtype=torch.long))


def test_unknown_backend(bert):
    with pytest.raises(BackendError, match="'nope'.*naive"):
        bert.set_attention("nope")


def test_fused_refusals(tiny):
    folder, _ = tiny("BertModel", hidden_act="gelu_new")
    with pytest.raises(BackendError, match="gelu_new"):
        minibt.from_hub(folder, attn="fused")
    model = minibt.from_hub(tiny("BertModel")[0], attn="fused")
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(BackendError, match="inference only"):
        model.train()(ids)
    model.eval()
    with pytest.raises(BackendError, match="autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
