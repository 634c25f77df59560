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


def llama_folder(tmp_path, seed=7, **kw):
    """A tiny Llama whose widths int4's 32-wide groups divide."""
    import transformers
    torch.manual_seed(seed)
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


SECOND_PROCESS = """
import json, sys, torch, minibt
from torch._dynamo.utils import counters
ids, mask = (torch.tensor(json.loads(a)) for a in sys.argv[2:])
out = minibt.from_hub(sys.argv[1]).generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                                            compile=True)
print(out.tolist(), counters["stats"]["unique_graphs"])
"""


def steps(tmp_path):
    return sorted((tmp_path / "inductor" / static_decode.STEPS_DIR).glob("*.bin"))


def test_a_second_process_loads_the_saved_step(monkeypatch, tmp_path, tiny_decoder):
    """The step is compiled ahead and saved; a new process loads it and traces nothing (no dynamo graph)."""
    import json
    import subprocess
    import sys
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = tiny_decoder("llama-gqa")[0]
    ids, mask = left_padded(99, 0)
    first = greedy(minibt.from_hub(folder), ids, mask, compile=True)
    assert len(steps(tmp_path)) == 1
    run = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(folder), json.dumps(ids.tolist()),
                          json.dumps(mask.tolist())], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tokens, traced = run.stdout.strip().rsplit(" ", 1)
    assert tokens == str(first.tolist()) and traced == "0"


def test_a_saved_step_serves_other_weights(monkeypatch, tmp_path):
    """The saved step takes the weights as arguments: a model of the same config with other weights loads it
    (compiles nothing) and gets its own eager tokens; the guards are checked once, not per step."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    ids, mask = left_padded(99, 0)
    a = minibt.from_hub(llama_folder(tmp_path / "a"))
    b = minibt.from_hub(llama_folder(tmp_path / "b", seed=8))
    assert not torch.equal(a.embed.weight, b.embed.weight)
    greedy(a, ids, mask, compile=True)
    before = graphs()
    assert torch.equal(greedy(b, ids, mask, compile=True), greedy(b, ids, mask))
    assert graphs() == before and len(steps(tmp_path)) == 1
    (fn,) = static_decode.SAVED[b].values()
    assert not fn._guard_check_enabled


def test_an_unusable_saved_step_is_compiled_again(monkeypatch, tmp_path):
    """A truncated file, or one whose guards refuse the arguments (another batch size's step under this key), is
    named in a warning, compiled again and replaced; the tokens are eager's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = llama_folder(tmp_path / "m")
    ids, mask = left_padded(99, 0)
    eager = greedy(minibt.from_hub(folder), ids, mask)
    greedy(minibt.from_hub(folder), ids[:1], mask[:1], compile=True)
    (one,) = steps(tmp_path)
    greedy(minibt.from_hub(folder), ids, mask, compile=True)
    (two,) = set(steps(tmp_path)) - {one}
    for bad in (two.read_bytes()[:1000], one.read_bytes()):
        two.write_bytes(bad)
        with pytest.warns(UserWarning, match=f"saved decode step {two}.*not usable.*compiling it again"):
            assert torch.equal(greedy(minibt.from_hub(folder), ids, mask, compile=True), eager)
        assert two.read_bytes() != bad
        assert torch.equal(greedy(minibt.from_hub(folder), ids, mask, compile=True), eager)     # no warning now


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
