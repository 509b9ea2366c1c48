"""Reading inputs in fixed chunks and writing committed part files: what makes a batch job resumable.

A chunk is rows ``[index * chunk_rows, (index + 1) * chunk_rows)`` of the input in read order, the same
on every run, so a part file is named by its chunk index and a rerun skips the chunks the manifest
lists as committed. Each part (and its errors file) is written to a temporary name and renamed into
place, then the manifest is rewritten the same way: a SIGKILL at any point leaves either a committed
part or one that the rerun writes again, never half a part or a row twice. The manifest records each
part's size and SHA-256, and the input's content hash (batch/digest.py): a rerun redoes a part whose file
is missing or changed, and refuses an output folder made from other input.

Input that cannot be read row by row never stops the job: a CSV line with the wrong number of fields, an
open quote or invalid UTF-8 (batch/csvread.py), or a JSONL line that is not a UTF-8 JSON object, is a row
error with its row number, and the rows after it keep theirs.

    source = open_source("rows.parquet", chunk_rows=65536)
    for chunk in source.chunks(skip={0, 1}):      # Chunk(index, start, rows | table)
        ...
"""

from __future__ import annotations

import glob
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from forwardpass._deps import require
from forwardpass.batch.csvread import CsvBlocks, read_header
from forwardpass.batch.digest import file_digest, input_fingerprint
from forwardpass.errors import InvalidInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FORMATS = ("parquet", "csv", "jsonl")


@dataclass
class Chunk:
    """Rows of the input: a pyarrow Table (Parquet, CSV) or a list of dicts (JSONL, images, prompts)."""

    index: int
    start: int  # global row number of the first row
    data: Any
    bad: dict[int, str] = field(default_factory=dict)  # row offset -> why it could not be read (bad JSON, CSV line)

    def __len__(self) -> int:
        return len(self.data) if isinstance(self.data, list) else self.data.num_rows


class Source(ABC):
    """An input file (or folder of images) read in chunks of ``chunk_rows`` rows."""

    kind = ""

    def __init__(self, path: str | Path, chunk_rows: int):
        self.path, self.chunk_rows = str(path), chunk_rows

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input for resuming: path, kind and a hash of the content (batch/digest.py)."""
        files = self.files()
        return {"path": self.path, "kind": self.kind, "files": len(files), **input_fingerprint(files)}

    def files(self) -> list[str]:
        return [self.path]

    def total_rows(self) -> int | None:
        return None

    def column_names(self) -> list[str]:
        """Column names when the input is a table with a schema (Parquet, CSV header), else []."""
        return []

    @abstractmethod
    def chunks(self, skip: set[int] = frozenset()) -> Iterator[Chunk]:  # type: ignore[assignment]
        """Chunks in input order, leaving out the indices in ``skip`` (committed by an earlier run)."""


class ParquetSource(Source):
    """A Parquet file; one that does not read is one error naming it (a damaged file has no rows to skip)."""

    kind = "parquet"

    def total_rows(self) -> int:
        return self._file().metadata.num_rows

    def column_names(self) -> list[str]:
        return list(self._file().schema_arrow.names)

    def chunks(self, skip: set[int] = frozenset()) -> Iterator[Chunk]:  # type: ignore[assignment]
        pa = require("pyarrow", "batch", "reading Parquet")
        # pre_buffer=False: with it, iter_batches keeps every row group it has read cached (peak RSS
        # grew ~35 MiB per million digits rows); without it memory stays flat and reading is as fast
        batches = self._file(pre_buffer=False).iter_batches(batch_size=self.chunk_rows, use_threads=False)
        index = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise InvalidInput(("input",), f"{self.path} is damaged after row {index * self.chunk_rows:,}: {exc}; "
                                   "write the file again") from None  # fmt: skip
            if batch is None:
                return
            if index not in skip:
                yield Chunk(index, index * self.chunk_rows, pa.Table.from_batches([batch]))
            index += 1

    def _file(self, **options: Any) -> Any:
        pq = require("pyarrow.parquet", "batch", "reading Parquet")
        pa = require("pyarrow", "batch", "reading Parquet")
        try:
            return pq.ParquetFile(self.path, **options)
        except (pa.ArrowException, OSError) as exc:
            raise InvalidInput(("input",), f"{self.path} is not a Parquet file that reads ({exc}); check that "
                               "it was written completely, or name it by its format (.csv, .jsonl)") from None  # fmt: skip


class CsvSource(Source):
    """CSV with a header; every column read as text (types are the model's business, bad cells are row errors).

    Row r is line r + 2 of the file; a line that is not a row (batch/csvread.py says which) is a row error."""

    kind = "csv"

    def total_rows(self) -> int:
        return max(_count_lines(self.path) - 1, 0)

    def column_names(self) -> list[str]:
        return read_header(self.path)[0]

    def chunks(self, skip: set[int] = frozenset()) -> Iterator[Chunk]:  # type: ignore[assignment]
        pa = require("pyarrow", "batch", "reading CSV")
        names, offset = read_header(self.path)
        yield from _rechunk(iter(CsvBlocks(self.path, names, offset)), self.chunk_rows, skip, pa)


class JsonlSource(Source):
    """One JSON object per line; a line that is not one is a row error, not the end of the job."""

    kind = "jsonl"

    def total_rows(self) -> int:
        return _count_lines(self.path)

    def chunks(self, skip: set[int] = frozenset()) -> Iterator[Chunk]:  # type: ignore[assignment]
        yield from _line_chunks(self.path, self.chunk_rows, skip, _json_row)


class PromptSource(Source):
    """A text file of prompts, one per line (generative models)."""

    kind = "prompts"

    def total_rows(self) -> int:
        return _count_lines(self.path)

    def chunks(self, skip: set[int] = frozenset()) -> Iterator[Chunk]:  # type: ignore[assignment]
        yield from _line_chunks(self.path, self.chunk_rows, skip, _prompt_row)


class ImageSource(Source):
    """A folder of images (sorted by name) or a glob pattern; each row is {"path": ...}."""

    kind = "images"

    def files(self) -> list[str]:
        if os.path.isdir(self.path):
            found = [str(p) for p in Path(self.path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            found = [p for p in glob.glob(self.path, recursive=True) if os.path.isfile(p)]
        return sorted(found)

    def total_rows(self) -> int:
        return len(self.files())

    def chunks(self, skip: set[int] = frozenset()) -> Iterator[Chunk]:  # type: ignore[assignment]
        files = self.files()
        for index, start in enumerate(range(0, len(files), self.chunk_rows)):
            if index not in skip:
                yield Chunk(index, start, [{"path": p} for p in files[start : start + self.chunk_rows]])


def open_source(path: str | Path, chunk_rows: int, generation: bool = False) -> Source:
    """The reader for ``path`` by its kind: .parquet, .csv, .jsonl/.ndjson, .txt (prompts), a folder or glob of images."""
    text = str(path)
    suffix = Path(text).suffix.lower()
    if os.path.isdir(text) or any(ch in text for ch in "*?["):
        source: Source = ImageSource(text, chunk_rows)
        if not source.files():
            raise InvalidInput(("input",), f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in", text)
        return source
    if not os.path.isfile(text):
        raise InvalidInput(("input",), "no such file", text)
    kinds: dict[str, Callable[[str, int], Source]] = {
        ".parquet": ParquetSource, ".pq": ParquetSource, ".csv": CsvSource, ".jsonl": JsonlSource,
        ".ndjson": JsonlSource, ".txt": PromptSource,
    }  # fmt: skip
    if suffix not in kinds:
        raise InvalidInput(("input",), "expected .parquet, .csv, .jsonl, .txt (prompts), or a folder/glob of images", text)
    if suffix == ".txt" and not generation:
        raise InvalidInput(("input",), "a .txt file is read as prompts, for generation models only", text)
    return kinds[suffix](text, chunk_rows)


def _count_lines(path: str) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _json_row(line: bytes) -> dict[str, Any]:
    try:
        row = orjson.loads(line)  # orjson checks UTF-8 itself
    except orjson.JSONDecodeError as exc:
        _utf8(line)
        raise ValueError(f"not a JSON object: {exc}") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row


def _prompt_row(line: bytes) -> dict[str, Any]:
    return {"prompt": _utf8(line)}


def _utf8(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line)") from None


def _line_chunks(path: str, chunk_rows: int, skip: set[int], parse: Any) -> Iterator[Chunk]:
    """Row r is line r + 1; lines end at \\n only (split as bytes, each decoded alone: a bad byte costs one row)."""
    index, start, rows, bad = 0, 0, [], {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if index not in skip:
                try:
                    rows.append(parse(line))
                except ValueError as exc:
                    bad[len(rows)] = f"line {start + len(rows) + 1}: {exc}"
                    rows.append(None)
            else:
                rows.append(None)
            if len(rows) == chunk_rows:
                if index not in skip:
                    yield Chunk(index, start, rows, bad)
                index, start, rows, bad = index + 1, start + chunk_rows, [], {}
    if rows and index not in skip:
        yield Chunk(index, start, rows, bad)


def _rechunk(blocks: Iterator[tuple[Any, dict[int, str]]], chunk_rows: int, skip: set[int],
             pa: Any) -> Iterator[Chunk]:  # fmt: skip
    """(table, bad rows of the block) of any sizes -> chunks of exactly chunk_rows rows (the last one shorter)."""
    pending, size, index, start = [], 0, 0, 0
    bad: deque[tuple[int, str]] = deque()  # (global row, reason), rows ascending

    def chunk(table: Any) -> Chunk:
        first = index * chunk_rows
        mine: dict[int, str] = {}
        while bad and bad[0][0] < first + table.num_rows:
            row, why = bad.popleft()
            mine[row - first] = why
        return Chunk(index, first, table, mine)

    for table, block_bad in blocks:
        bad.extend((start + i, why) for i, why in sorted(block_bad.items()))
        start += table.num_rows
        pending.append(table)
        size += table.num_rows
        while size >= chunk_rows:
            whole = pa.concat_tables(pending)
            part = chunk(whole.slice(0, chunk_rows))
            if index not in skip:
                yield part
            rest = whole.slice(chunk_rows)
            pending, size, index = [rest], rest.num_rows, index + 1
    if size:
        part = chunk(pa.concat_tables(pending))
        if index not in skip:
            yield part


class PartWriter:
    """Output folder: part-NNNNN.<format> + _part_errors/part-NNNNN.jsonl + _manifest.json, each committed atomically.

    ``PartWriter(folder, fmt)`` checks the folder and reads an earlier run's manifest (both cheap, before the
    input is hashed); ``begin(job)`` then takes the job up: a manifest of another job is refused, and each
    part it lists is checked against its recorded size and SHA-256; one missing or changed is done again.
    """

    def __init__(self, folder: str | Path, fmt: str):
        if fmt not in FORMATS:
            raise InvalidInput(("format",), f"expected one of {', '.join(FORMATS)}", fmt)
        self.folder, self.fmt = output_folder(folder), fmt
        (self.folder / "_part_errors").mkdir(exist_ok=True)
        self.manifest_path = self.folder / "_manifest.json"
        self.found = _read_manifest(self.manifest_path)
        self.manifest: dict[str, Any] = {"job": {}, "parts": {}, "complete": False}
        self.redone: list[str] = []  # parts of an earlier run done again: "part-00003.parquet: missing"

    def begin(self, job: dict[str, Any]) -> None:
        """Start or continue ``job`` in this folder."""
        found = self.found
        if found is None:
            self.manifest = {"job": job, "parts": {}, "complete": False}
            return
        if found["job"] != job:
            raise InvalidInput(("output",), f"{self.folder} holds another job's parts (a different input, model "
                               "or settings); choose a new output folder or delete it", str(self.folder))  # fmt: skip
        self.manifest = found
        for key, entry in list(found["parts"].items()):
            why = self._changed(int(key), entry)
            if why:
                del found["parts"][key]
                self.redone.append(why)
        if self.redone:
            found["complete"] = False
            self._save()

    @property
    def done(self) -> set[int]:
        return {int(i) for i in self.manifest["parts"]}

    def counts(self) -> tuple[int, int]:
        """(rows written, rows failed) over the committed parts."""
        parts = self.manifest["parts"].values()
        return sum(p["rows"] for p in parts), sum(p["errors"] for p in parts)

    def commit(self, index: int, table: Any, errors: list[dict[str, Any]]) -> None:
        name = f"part-{index:05d}"
        entry: dict[str, Any] = {"rows": table.num_rows, "errors": len(errors)}
        part = self.folder / f"{name}.{self.fmt}"
        if table.num_rows:
            _atomic(part, lambda tmp: _write_table(table, tmp, self.fmt))
            entry["part"] = file_digest(part)  # read back from the page cache: ~1 ms for a 1 MB part
        else:  # every row failed: no part file (its schema would differ from the others'), the manifest says done
            part.unlink(missing_ok=True)
        errors_part = self.folder / "_part_errors" / f"{name}.jsonl"
        _atomic(errors_part, lambda tmp: tmp.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in errors)))
        entry["errors_part"] = file_digest(errors_part)
        self.manifest["parts"][str(index)] = entry
        self._save()

    def finish(self) -> Path:
        """Mark the job complete and gather every part's errors into _errors.jsonl (sorted by row)."""
        rows = []
        for index in sorted(self.done):
            rows += (self.folder / "_part_errors" / f"part-{index:05d}.jsonl").read_bytes().splitlines()
        _atomic(self.folder / "_errors.jsonl", lambda tmp: tmp.write_bytes(b"".join(r + b"\n" for r in rows)))
        self.manifest["complete"] = True
        self._save()
        return self.folder / "_errors.jsonl"

    def _changed(self, index: int, entry: dict[str, Any]) -> str:
        """Why a committed part cannot be skipped ('' when its files are as the manifest recorded them)."""
        files = [(f"_part_errors/part-{index:05d}.jsonl", entry.get("errors_part"))]
        if entry["rows"]:
            files.insert(0, (f"part-{index:05d}.{self.fmt}", entry.get("part")))
        for name, recorded in files:
            path = self.folder / name
            if not isinstance(recorded, dict):
                return f"{name}: no size and checksum recorded"
            if not path.is_file():
                return f"{name}: missing"
            size = path.stat().st_size
            if size != recorded.get("bytes"):
                return f"{name}: {size} bytes, {recorded.get('bytes')} when committed (truncated or rewritten)"
            if file_digest(path)["sha256"] != recorded.get("sha256"):
                return f"{name}: content changed since it was committed (SHA-256 differs)"
        return ""

    def _save(self) -> None:
        _atomic(self.manifest_path, lambda tmp: tmp.write_bytes(orjson.dumps(self.manifest, option=orjson.OPT_INDENT_2)))


def output_folder(folder: str | Path) -> Path:
    """The output folder, created if new; a path that is a file, or that cannot be created, is one clear error."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InvalidInput(("output",), f"{path} is a file; batch writes a folder (part files, _errors.jsonl, "
                           "_manifest.json): give a new folder, or an earlier run's folder")  # fmt: skip
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(("output",), f"cannot create the folder {path}: {exc.strerror or exc}; give a folder "
                           "this user can write") from None  # fmt: skip
    return path


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """An earlier run's manifest, checked for shape; None when there is none."""
    if not path.exists():
        return None
    fix = (f"it is rewritten whole on every commit, so it was edited or the disk failed; delete {path.parent} to "
           "start again, or choose another output folder")  # fmt: skip
    try:
        found = orjson.loads(path.read_bytes())
    except (orjson.JSONDecodeError, OSError) as exc:
        raise InvalidInput(("output",), f"{path} is not readable JSON ({exc}); {fix}") from None
    parts = found.get("parts") if isinstance(found, dict) else None
    if not (isinstance(found, dict) and isinstance(found.get("job"), dict) and isinstance(parts, dict)
            and all(k.isdigit() and isinstance(v, dict) and isinstance(v.get("rows"), int)
                    and isinstance(v.get("errors"), int) for k, v in parts.items())):  # fmt: skip
        raise InvalidInput(("output",), f"{path} is not a batch manifest (expected {{\"job\": {{...}}, \"parts\": "
                           f"{{\"0\": {{\"rows\": ..., \"errors\": ...}}}}, \"complete\": ...}}); {fix}")  # fmt: skip
    return found


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_table(table: Any, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pa = require("pyarrow", "batch", "writing Parquet")
        # dictionary-encode only text: hashing 65k distinct row numbers or probabilities costs 3x the
        # plain write and saves nothing (measured: a digits part 24 ms -> 8 ms)
        text = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        require("pyarrow.parquet", "batch", "writing Parquet").write_table(table, str(path), use_dictionary=text)
    elif fmt == "csv":
        pa = require("pyarrow", "batch", "writing CSV")
        flat = table
        for i, f in enumerate(table.schema):
            if pa.types.is_list(f.type):  # CSV cells cannot hold lists: JSON text
                flat = flat.set_column(i, f.name, pa.array([orjson.dumps(v).decode() for v in table.column(i).to_pylist()]))
        require("pyarrow.csv", "batch", "writing CSV").write_csv(flat, str(path))
    else:
        path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in table.to_pylist()))
