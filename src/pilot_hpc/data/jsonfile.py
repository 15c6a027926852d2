"""Where in a JSON file a problem sits, for error messages that name the record.

Only called once reading a file has failed, so these helpers read the whole file again
and parse it in Python: simple rather than fast.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = re.compile(r"\s*")


def path_at(text: str, pos: int, depth: int = 2) -> list:
    """The keys and indices leading from the top level of the JSON `text` to the value
    that holds character `pos` (or whose key does), at most `depth` levels deep; [] when
    `pos` is in no element, or the text is not JSON up to there."""
    decoder = json.JSONDecoder()
    steps: list = []
    i = _WS.match(text, 0).end()
    try:
        for _ in range(depth):
            if i >= len(text) or text[i] not in "[{":
                break
            is_object = text[i] == "{"
            i = _WS.match(text, i + 1).end()
            index = 0
            while text[i] not in "]}":
                start = i
                key = index
                if is_object:
                    key, i = decoder.raw_decode(text, i)
                    i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # past the ':'
                value_start = i
                _, end = decoder.raw_decode(text, i)
                if start <= pos < end:
                    steps.append(key)
                    if pos < value_start:
                        return steps
                    i = value_start
                    break
                i = _WS.match(text, end).end()
                if text[i] == ",":
                    i = _WS.match(text, i + 1).end()
                index += 1
            else:
                return steps
    except (ValueError, IndexError):  # malformed before `pos`: the steps found so far
        pass
    return steps


@dataclass
class NotUTF8:
    """The first byte of a file that is not UTF-8."""

    text: str  # the file decoded with its bad bytes replaced (U+FFFD)
    pos: int  # that byte's character index in `text`
    where: str  # "byte 0xe9 at byte offset 94 (line 3, column 12)"

    def json_path(self, depth: int = 2) -> str:
        """['key'][index] down to the value holding the byte ("" if none is found)."""
        return "".join(f"[{s!r}]" for s in path_at(self.text, self.pos, depth))


def first_bad_byte(path: str) -> NotUTF8 | None:
    """Where `path` stops being UTF-8, or None when all of it is."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        offset = err.start
    before = raw[:offset].decode("utf-8")  # valid up to the first bad byte
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return NotUTF8(raw.decode("utf-8", errors="replace"), len(before),
                   f"byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}, column {column})")


# How to fix it, for the messages that report a NotUTF8.
REENCODE = "JSON files are UTF-8: re-encode it (e.g. iconv -f latin1 -t utf-8 FILE > NEW)"
