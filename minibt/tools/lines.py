"""The one line rule of `minibt embed --file` (a file or stdin) and `minibt embed --ray`: row i of the output is
line i of the input, whatever the bytes.

  * the input is read as bytes and lines end at b"\\n" only; one "\\r" before it (a CRLF file) is dropped, any other
    "\\r" (or form feed, U+2028, ...) stays inside its line's text; a last line without "\\n" is a line;
  * a UTF-8 byte-order mark at the very start of a file (or of stdin) is dropped;
  * each line is decoded as UTF-8; invalid bytes become U+FFFD (the caller reports the count and the first such line);
  * an empty line is the empty text;
  * a line of more than MAX_LINE_BYTES bytes (not counting its "\n") is refused (InputError naming the input, the
    line number and the limit), read no further than the limit + 1 bytes.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

from ..errors import InputError

BOM = b"\xef\xbb\xbf"
# The longest max_seq_length of the families minibt embeds is 8192 tokens (ModernBERT, nomic-bert); real text takes
# 1-5 bytes per token, so 128 bytes per token is far above any line whose text the model can see, and a line past it
# would be almost all truncated away while costing ~40x its size in memory to tokenize (a 200 MB line: 8.3 GB).
MAX_LINE_TOKENS, BYTES_PER_TOKEN = 8192, 128
MAX_LINE_BYTES = MAX_LINE_TOKENS * BYTES_PER_TOKEN          # 1 MiB


class Lines:
    """The lines of a binary stream by the rule above, with the SHA-256 and byte count of everything consumed so far
    and the lines that were not valid UTF-8 (how many, the number of the first). `at_start`: the stream begins at
    the start of its file, where a byte-order mark is dropped (False for a byte range inside a file). `name`: the
    input, as the error for an over-long line names it."""

    def __init__(self, stream, at_start: bool = True, name: str = "input"):
        self.stream, self.at_start, self.sha, self.bytes, self.line_no = stream, at_start, hashlib.sha256(), 0, 0
        self.name = name
        self.invalid, self.first_invalid = 0, None

    def take(self, n: int) -> list[str]:
        texts = []
        while len(texts) < n:
            raw = self.stream.readline(MAX_LINE_BYTES + 1)       # never more of one line in memory
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise InputError(f"{self.name} line {self.line_no + 1}: longer than {MAX_LINE_BYTES} bytes, the limit "
                                 f"on one line ({MAX_LINE_TOKENS} tokens x {BYTES_PER_TOKEN} bytes: far more text "
                                 "than the model reads, which truncates it); split or shorten that line")
            self.sha.update(raw)
            self.bytes += len(raw)
            self.line_no += 1
            line = raw.removesuffix(b"\n").removesuffix(b"\r")
            if self.line_no == 1 and self.at_start:
                line = line.removeprefix(BOM)
            try:
                texts.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                self.invalid += 1
                self.first_invalid = self.first_invalid or self.line_no
                texts.append(line.decode("utf-8", errors="replace"))
        return texts


def split(data: bytes, at_start: bool, name: str = "input") -> list[str]:
    """Every line of `data`, a whole file (`at_start`) or a byte range of one that starts a line."""
    return Lines(io.BytesIO(data), at_start, name).take(len(data))        # never more lines than bytes


def count_lines(path: Path) -> int:
    """Lines by the rule above (b"\\n"-terminated, plus a last unterminated one), read in 1 MiB blocks."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")
