"""Real text for tests and benchmarks: paragraphs of docstrings from Python source trees (the standard library,
an installed package). Benchmarks load this file by path (benchmarks/_report.py test_module); nothing edits
sys.path."""
from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

SKIP = ("test", "tests", "idlelib", "site-packages", "lib2to3")


def docstring_paragraphs(root: Path, *, recursive: bool = True, skip=SKIP) -> list[str]:
    """Every docstring paragraph of 3-200 words under `root`, whitespace collapsed, in file order."""
    out = []
    for path in sorted(root.rglob("*.py") if recursive else root.glob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for para in (ast.get_docstring(node) or "").split("\n\n"):
                    if 3 <= len(para.split()) <= 200:
                        out.append(" ".join(para.split()))
    return out


def stdlib_corpus(n: int = 4000, seed: int = 0, recursive: bool = True) -> list[str]:
    """n paragraphs of the standard library's docstrings, shuffled with a fixed seed (recursive=False: top-level
    modules only, quicker to parse)."""
    paragraphs = docstring_paragraphs(Path(sysconfig.get_paths()["stdlib"]), recursive=recursive)
    random.Random(seed).shuffle(paragraphs)
    if len(paragraphs) < min(n, 10 ** 5):
        assert len(paragraphs) >= n, f"only {len(paragraphs)} paragraphs, asked for {n}"
    return paragraphs[:n]
