"""The hub code path, offline: a repo id resolved from a hub cache folder built here (no network)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path



def add_snapshot(cache: Path, repo: str, commit: str, files: dict, refs=("main",)):
    """Lay out a snapshot as huggingface_hub does: blobs are plain files here, refs/<name> holds the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


def run_offline(cache, code):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_repo_id_from_offline_cache_with_revision(tiny, tmp_path):
    base, _ = tiny("BertModel")
    mlm, _ = tiny("BertForMaskedLM")
    add_snapshot(tmp_path, "acme/tiny-bert", "a" * 40, {f.name: f for f in base.iterdir()})
    add_snapshot(tmp_path, "acme/tiny-bert", "b" * 40, {f.name: f for f in mlm.iterdir()}, refs=("v2",))
    r = run_offline(tmp_path, "import minibt; print(minibt.from_hub('acme/tiny-bert').head, "
                              "minibt.from_hub('acme/tiny-bert', revision='v2').head, "
                              f"minibt.from_hub('acme/tiny-bert', revision='{'a' * 40}').head)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["base", "masked-lm", "base"]


def test_missing_repo_offline_is_a_clear_error(tmp_path):
    r = run_offline(tmp_path, "import minibt; minibt.from_hub('acme/not-cached')")
    assert r.returncode != 0
    assert "CheckpointError" in r.stderr and "acme/not-cached" in r.stderr


def test_real_minilm_through_hub_cache(minilm, tmp_path):
    files = {p.relative_to(minilm).as_posix(): p for p in minilm.rglob("*") if p.is_file()}
    add_snapshot(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", "c" * 40, files)
    r = run_offline(tmp_path, "import minibt, json\n"
                              "name = 'sentence-transformers/all-MiniLM-L6-v2'\n"
                              "m = minibt.from_hub(name); tok = minibt.load_tokenizer(name)\n"
                              "v = minibt.embed(m, tok, ['hello world'])\n"
                              "print(json.dumps([list(v.shape), str(m.source)]))")
    assert r.returncode == 0, r.stderr
    shape, source = json.loads(r.stdout)
    assert shape == [1, 384] and source.startswith(str(tmp_path))
