"""Write one benchmark's section of docs/benchmarks.md in place (each benchmark owns one marked section)."""
from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nEvery table here was written by the command above it, minibt and `transformers` measured in the "
          "same run on the same weights and inputs; read the ratios, not the absolute times (machines are noisy).\n")


def test_module(name: str):
    """A module of tests/ (fixtures shared with the test suite), loaded by path: nothing edits sys.path."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_section(name: str, body: str) -> None:
    command = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    block = f"<!-- {name} -->\n## {name}\n\n```\n{command}\n```\n\n{machine()}\n\n{body.strip()}\n<!-- /{name} -->\n"
    text = DOC.read_text() if DOC.is_file() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(block)


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
