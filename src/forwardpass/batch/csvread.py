"""CSV read in blocks of whole lines: pyarrow parses a clean block at C speed, the lines around a bad one
are read one by one, so a bad line costs only itself and every row keeps its number.

A row is one line after the header: row ``r`` is line ``r + 2`` of the file (lines counted from 1), on
every run and after any bad line. A quoted field must end on the line it starts on: a newline inside
quotes does not continue the field, so each line of such a field is a row of its own (the first says
its quote does not close; the others usually have the wrong number of fields). Text with newlines
belongs in JSONL or Parquet.

A block (4 MiB of whole lines) is clean when pyarrow reads it without an error or an invalid row and
gives one row per line (a quote running past its line, an empty line or a carriage return inside a
line would change that count). Then its table is used as it is, with no Python per row. Otherwise it
is halved at a line boundary and each half tried the same way, down to parts of ``SMALL`` lines: only
those are checked line by line in Python (UTF-8, fields counted with the csv module as pyarrow counts
them), their good lines parsed by pyarrow again, and each bad line becomes a null row with its reason.
One bad line in a block costs about two more parses of the block, not Python for each of its rows.

    header, offset = read_header("rows.csv")
    for table, bad in CsvBlocks("rows.csv", header, offset):   # bad: {row in the block: reason}
        ...
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.errors import InvalidInput

BLOCK = 1 << 22
SMALL = 256  # lines: a part of a bad block this small is read line by line
_HEADER_LIMIT = 1 << 20


def read_header(path: str) -> tuple[list[str], int]:
    """The header's column names and the byte offset of the first data line."""
    with open(path, "rb") as f:
        line = f.readline(_HEADER_LIMIT)
    if len(line) == _HEADER_LIMIT and not line.endswith(b"\n"):
        raise InvalidInput(("input",), f"{path}: the first line is over 1 MiB; expected a CSV header naming "
                           "the columns")  # fmt: skip
    try:
        text = line.rstrip(b"\r\n").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(("input",), f"{path}: the header line is not UTF-8 text (byte 0x{line[exc.start]:02x} at "
                           f"byte {exc.start + 1}); save the file as UTF-8") from None  # fmt: skip
    try:
        names = next(csv.reader([text]), [])
    except csv.Error as exc:  # a carriage return alone (old Mac line ends), a quote that does not close
        raise InvalidInput(("input",), f"{path}: the header line is not one CSV line ({exc}); lines must end "
                           "with \\n or \\r\\n") from None  # fmt: skip
    if not any(name.strip() for name in names):
        raise InvalidInput(("input",), f"{path}: no header line; expected the first line to name the columns")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidInput(("input",), f"{path}: the header names {twice} more than once; give each column its "
                           "own name")  # fmt: skip
    return names, len(line)


class CsvBlocks:
    """(table, bad rows) per block of lines; the table has one row per line, all text, null where a line is bad."""

    def __init__(self, path: str, names: list[str], offset: int):
        self.path, self.names, self.offset = path, names, offset
        self.pa = require("pyarrow", "batch", "reading CSV")
        self.pcsv = require("pyarrow.csv", "batch", "reading CSV")
        text = {n: self.pa.string() for n in names}
        self.convert = self.pcsv.ConvertOptions(column_types=text, strings_can_be_null=True)

    def __iter__(self) -> Iterator[tuple[Any, dict[int, str]]]:
        row = 0
        for block in self._blocks():
            lines = block.count(b"\n") + (not block.endswith(b"\n"))
            table = self._fast(block, lines)
            bad: dict[int, str] = {}
            if table is None:
                table, bad = self._careful(block, lines, row)
            yield table, bad
            row += lines

    def _blocks(self) -> Iterator[bytes]:
        """The data lines in blocks of about BLOCK bytes, each ending at a newline (the last maybe not)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            rest = b""
            while data := f.read(BLOCK):
                buf = rest + data if rest else data
                cut = buf.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: read on
                    rest = buf
                    continue
                rest = buf[cut:]
                yield buf[:cut] if rest else buf
            if rest:
                yield rest

    def _parse(self, data: bytes, one_block: bool = False) -> tuple[Any, bool]:
        """pyarrow's table for ``data`` and whether every row had the header's field count; raises ArrowInvalid."""
        invalid: list[int] = []

        def count(row: Any) -> str:
            invalid.append(1)
            return "skip"

        read = self.pcsv.ReadOptions(column_names=self.names, block_size=len(data) + 1 if one_block else 1 << 20)
        table = self.pcsv.read_csv(self.pa.py_buffer(data), read_options=read, convert_options=self.convert,
                                   parse_options=self.pcsv.ParseOptions(invalid_row_handler=count))  # fmt: skip
        return table, not invalid

    def _fast(self, block: bytes, lines: int) -> Any:
        """The block's table when it is clean, else None."""
        returns = block.count(b"\r")
        if returns and returns != block.count(b"\r\n"):
            return None
        try:
            table, whole = self._parse(block)
        except self.pa.ArrowInvalid:  # invalid UTF-8, a quote open at the end, a line over 1 MiB
            return None
        return table if whole and table.num_rows == lines else None

    def _careful(self, block: bytes, lines: int, first_row: int) -> tuple[Any, dict[int, str]]:
        """A block with a bad line: halves that pyarrow reads clean are kept whole, down to SMALL lines; those
        are read line by line. One bad line in a block costs about two more parses of it, not Python per row."""
        tables, bad = [], {}
        todo = [(block, lines, 0)]  # (data, lines, first line in the block), in order, as a stack
        while todo:
            data, count, at = todo.pop()
            table = None if at == 0 and count == lines else self._fast(data, count)  # the whole block failed already
            if table is None and count > SMALL:
                mid = data.find(b"\n", len(data) // 2) + 1
                if 0 < mid < len(data):
                    left = data[:mid].count(b"\n")
                    todo += [(data[mid:], count - left, at + left), (data[:mid], left, at)]
                    continue
            if table is None:
                table, found = self._lines(data, first_row + at)
                bad.update({at + i: why for i, why in found.items()})
            tables.append(table)
        return self.pa.concat_tables(tables), bad

    def _lines(self, block: bytes, first_row: int) -> tuple[Any, dict[int, str]]:
        """Line by line: bad lines get a reason, good ones are parsed together; null rows stand in for the bad."""
        lines = block.split(b"\n")
        if block.endswith(b"\n"):
            lines.pop()
        try:  # what the whole block is free of need not be looked for in each line (~0.5 us a line then)
            block.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        quotes = b'"' in block
        returns = block.count(b"\r") != block.count(b"\r\n")
        bad: dict[int, str] = {}
        good: list[int] = []
        for i, raw in enumerate(lines):
            line = raw[:-1] if raw.endswith(b"\r") else raw
            reason = self._check(line, utf8, quotes, returns)
            if reason:
                bad[i] = f"line {first_row + i + 2}: {reason}"
            else:
                good.append(i)
                lines[i] = line
        table = self._good([lines[i] for i in good], good, bad, first_row)
        positions = np.full(len(lines), -1, dtype=np.int64)
        positions[good] = np.arange(len(good))
        return table.take(self.pa.array(positions, mask=positions < 0)), bad

    def _check(self, line: bytes, utf8: bool, quotes: bool, returns: bool) -> str:
        """Why a line cannot be a row ('' when it can); the flags say what its block may hold."""
        width = len(self.names)
        if not utf8:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f"byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line"
                return f"not UTF-8 text ({where}): {_clip(line)}"
        if not line.strip():
            return f"an empty line (expected {width} fields)"
        if returns and b"\r" in line:
            return f"a carriage return inside the line (lines end with \\n or \\r\\n): {_clip(line)}"
        if quotes and b'"' in line:
            reader = csv.reader([line.decode("utf-8"), ""])
            try:
                count = len(next(reader))
            except csv.Error as exc:
                return f"not a CSV line ({exc}): {_clip(line)}"
            if reader.line_num > 1:  # the record ran on into the next line: a quote opened and not closed
                return ("a quote opens a field and does not close on this line (a quoted field must end on its "
                        f"line; newlines inside quotes are not read): {_clip(line)}")  # fmt: skip
        else:
            count = line.count(b",") + 1
        if count != width:
            return f"expected {width} fields (as the header has), got {count}: {_clip(line)}"
        return ""

    def _good(self, lines: list[bytes], good: list[int], bad: dict[int, str], first_row: int) -> Any:
        """The good lines as one table, one row each; a line pyarrow still reads otherwise becomes bad."""
        empty = self.pa.table({n: self.pa.array([], self.pa.string()) for n in self.names})
        if not lines:
            return empty
        try:
            table, whole = self._parse(b"\n".join(lines) + b"\n", one_block=True)
            if whole and table.num_rows == len(lines):
                return table
        except self.pa.ArrowInvalid:
            pass
        parts, kept = [], []  # the csv module and pyarrow disagree about some line: ask pyarrow one line at a time
        for i, line in zip(good, lines):
            try:
                table, whole = self._parse(line + b"\n", one_block=True)
                why = "" if whole and table.num_rows == 1 else f"pyarrow reads it as {table.num_rows} rows"
            except self.pa.ArrowInvalid as exc:
                why = str(exc)
            if why:
                bad[i] = f"line {first_row + i + 2}: not a CSV line ({why}): {_clip(line)}"
            else:
                parts.append(table)
                kept.append(i)
        good[:] = kept
        return self.pa.concat_tables([empty, *parts])


def _clip(line: bytes, limit: int = 60) -> str:
    text = line[: limit * 4].decode("utf-8", "backslashreplace")  # a bad byte shows as \xff
    return f"'{text}'" if len(text) <= limit else f"'{text[:limit]}...'"
