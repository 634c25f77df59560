"""generate(..., compile=True): the compiled static decode step (minibt/kernels/static_decode.py) gives eager's
greedy tokens, family by family and through the quantized linears, and refuses what it cannot run by name.
Compiles in inductor's default mode (seconds per tiny model); max-autotune is the benchmark's."""
import pytest
import torch

import minibt
from conftest import left_padded
from minibt.errors import BackendError
from minibt.kernels import static_decode


def greedy(model, ids, mask, new=12, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], **kw)


def graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


# a window shorter than the prompt (ring caches that wrap), softcaps, ALiBi, OPT's post-LN + projections, Qwen3's
# q/k norms; the left-padded batch has a 1-token row
@pytest.mark.parametrize("name", ["mistral-window", "gemma2", "bloom-alibi", "opt-post-ln-projected", "qwen3"])
def test_compiled_greedy_tokens_are_eager_ones(tiny_decoder, name):
    folder, _ = tiny_decoder(name)
    model = minibt.from_hub(folder)
    ids, mask = left_padded(99, 0)
    eager = greedy(model, ids, mask)
    before = graphs()
    assert torch.equal(greedy(model, ids, mask, compile=True), eager)
    assert graphs() == before + 1                               # one graph, the step itself: nothing fell back
    # another length in the same cache bucket, and a shorter prompt: the same graph, eager's tokens
    assert torch.equal(greedy(model, ids, mask, new=20, compile=True), greedy(model, ids, mask, new=20))
    assert torch.equal(greedy(model, ids[:, 3:], mask[:, 3:], compile=True), greedy(model, ids[:, 3:], mask[:, 3:]))
    assert graphs() == before + 1


@pytest.mark.parametrize("name", ["mistral-window", "gemma2", "bloom-alibi", "opt-post-ln-projected",
                                  "llama3-mqa-tied-bias-headdim"])
def test_one_row_steps_give_eager_tokens(tiny_decoder, name):
    """Batch 1: the step's products take decode_linear.one_row over row-major weights (generate re-lays the fp32
    weights out); the tokens are eager's, before and after that."""
    folder, _ = tiny_decoder(name)
    model = minibt.from_hub(folder)
    ids, mask = left_padded(99, 0)
    ids, mask = ids[:1], mask[:1]
    eager = greedy(model, ids, mask, new=16)
    assert torch.equal(greedy(model, ids, mask, new=16, compile=True), eager)
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.equal(greedy(model, ids, mask, new=16), eager)


def llama_folder(tmp_path, **kw):
    """A tiny Llama whose widths int4's 32-wide groups divide."""
    import transformers
    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=99, max_position_embeddings=64, **kw)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_take_the_same_step(tmp_path, scheme):
    model = minibt.from_hub(llama_folder(tmp_path), quantize=scheme)
    ids, mask = left_padded(99, 0)
    assert torch.equal(greedy(model, ids, mask, compile=True), greedy(model, ids, mask))
    one = ids[:1], mask[:1]                                      # one row: int8 takes one_row
    assert torch.equal(greedy(model, *one, compile=True), greedy(model, *one))


def test_bf16_tokens_are_eager_ones_up_to_rounding(tmp_path):
    """In bf16, inductor's fused kernels round in other places than eager's ops do, so a near-tie may break the
    other way (tiny random models are full of them). Each compiled token must be eager's argmax, or within the bf16
    rounding of eager's best logit given the same prefix."""
    model = minibt.from_hub(llama_folder(tmp_path), dtype=torch.bfloat16)
    ids, mask = left_padded(99, 0)
    out = greedy(model, ids, mask, compile=True)
    s = ids.shape[1]
    full = torch.cat([mask, torch.ones_like(out[:, s:])], 1)
    with torch.inference_mode():
        logits = model(out, attention_mask=full).logits[:, s - 1:-1].float()      # eager, teacher-forced
    chosen = logits.gather(-1, out[:, s:, None])[..., 0]
    best = logits.max(-1).values
    assert bool(((best - chosen) <= 2 * 2 ** -8 * best.abs().clamp(min=1)).all()), (best - chosen).max()
    assert (out[:, s:] == logits.argmax(-1)).float().mean() > 0.9


def test_refused_by_name(tiny_decoder):
    ids, mask = left_padded(99, 0)
    before = graphs()
    oss = minibt.from_hub(tiny_decoder("gpt-oss")[0])
    with pytest.raises(BackendError, match="gpt-oss"):
        greedy(oss, ids, mask, compile=True)
    llama = minibt.from_hub(tiny_decoder("llama-gqa")[0])
    with pytest.raises(BackendError, match="compile='fast'"):
        greedy(llama, ids, mask, compile="fast")
    dynamic = minibt.from_hub(tiny_decoder("llama-dynamic-rope")[0])        # max_position_embeddings 32, factor 2
    with pytest.raises(BackendError, match=r"dynamic RoPE.*\(32\).*39 positions"):
        greedy(dynamic, ids, mask, new=30, compile=True)
    assert torch.equal(greedy(dynamic, ids, mask, new=20, compile=True), greedy(dynamic, ids, mask, new=20))
    assert graphs() == before + 1                           # the refused ones compiled nothing


def test_a_second_compile_reads_the_disk_cache(monkeypatch, tmp_path, tiny_decoder):
    """What a second process does: trace again, then load inductor's compiled graph from the disk cache instead
    of compiling it (dynamo's in-memory state reset stands for the new process)."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = minibt.from_hub(tiny_decoder("llama-gqa")[0])
    ids, mask = left_padded(99, 0)
    first = greedy(model, ids, mask, compile=True)
    assert any((tmp_path / "inductor").rglob("*.py"))                      # the compiled graph is on disk there
    torch._dynamo.reset()
    hits = counters["inductor"]["fxgraph_cache_hit"]
    assert torch.equal(greedy(model, ids, mask, compile=True), first)
    assert counters["inductor"]["fxgraph_cache_hit"] == hits + 1


def test_cache_dir_defaults_under_minibt(monkeypatch, tiny_decoder):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")          # recorded, so the test leaves the env as it found it
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    model = minibt.from_hub(tiny_decoder("llama-gqa")[0])
    static_decode.compiled(model, "default", torch.device("cpu"))
    import os
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(static_decode.CACHE_DIR)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")            # the user's choice is kept
    static_decode.compiled(model, "max-autotune", torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_cuda_graph_step_gives_eager_tokens(tmp_path):
    model = minibt.from_hub(llama_folder(tmp_path), device="cuda")
    ids, mask = (t.cuda() for t in left_padded(99, 0))
    eager = greedy(model, ids, mask, new=20)
    assert torch.equal(greedy(model, ids, mask, new=20, compile=True), eager)
    assert torch.equal(greedy(model, ids, mask, new=20, compile=True), eager)   # a replay of the recorded graph


def test_cli_compile_flag(capsys):
    from minibt.tools import cli
    parse = cli.parser().parse_args
    assert parse(["generate", "--model", "m", "x"]).compile is None
    assert parse(["generate", "--model", "m", "x", "--compile"]).compile == "default"
    assert parse(["generate", "--model", "m", "--compile", "max-autotune", "x"]).compile == "max-autotune"
    with pytest.raises(SystemExit) as e:
        parse(["generate", "--model", "m", "--compile", "fast", "x"])
    assert e.value.code == 2 and "--compile" in capsys.readouterr().err
