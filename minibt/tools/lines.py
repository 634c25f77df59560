"""The one line rule of `minibt embed --file` (a file or stdin) and `minibt embed --ray`: row i of the output is
line i of the input, whatever the bytes.

  * the input is read as bytes and lines end at b"\\n" only; one "\\r" before it (a CRLF file) is dropped, any other
    "\\r" (or form feed, U+2028, ...) stays inside its line's text; a last line without "\\n" is a line;
  * a UTF-8 byte-order mark at the very start of a file (or of stdin) is dropped;
  * each line is decoded as UTF-8; invalid bytes become U+FFFD (the caller reports the count and the first such line);
  * an empty line is the empty text.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

BOM = b"\xef\xbb\xbf"


class Lines:
    """The lines of a binary stream by the rule above, with the SHA-256 and byte count of everything consumed so far
    and the lines that were not valid UTF-8 (how many, the number of the first). `at_start`: the stream begins at
    the start of its file, where a byte-order mark is dropped (False for a byte range inside a file)."""

    def __init__(self, stream, at_start: bool = True):
        self.stream, self.at_start, self.sha, self.bytes, self.line_no = stream, at_start, hashlib.sha256(), 0, 0
        self.invalid, self.first_invalid = 0, None

    def take(self, n: int) -> list[str]:
        texts = []
        while len(texts) < n:
            raw = self.stream.readline()
            if not raw:
                break
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


def split(data: bytes, at_start: bool) -> list[str]:
    """Every line of `data`, a whole file (`at_start`) or a byte range of one that starts a line."""
    return Lines(io.BytesIO(data), at_start).take(len(data))        # never more lines than bytes


def count_lines(path: Path) -> int:
    """Lines by the rule above (b"\\n"-terminated, plus a last unterminated one), read in 1 MiB blocks."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")
