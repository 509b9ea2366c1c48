"""`forwardpass batch` never crashes on its input: malformed CSV lines are row errors, a bad output path or
manifest is one line and exit 2, a missing feature column fails at the start, resume verifies the parts it
skips, and the input fingerprint sees an edit that keeps size and mtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import forwardpass  # noqa: E402


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m forwardpass batch ...` in a subprocess: the exit code and output a user sees."""
    cmd = [sys.executable, "-m", "forwardpass", "batch", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def features(demo_repo: Path) -> list[str]:
    return [f.name for f in forwardpass.load("breast-cancer", repository=demo_repo).inputs[0].features]


def csv_lines(demo_repo: Path, rows: int) -> tuple[list[bytes], np.ndarray]:
    """A header and ``rows`` lines 'r<i>,<30 features>' (the row number is in the key)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer().data[np.arange(rows) % 569]
    head = ",".join(["key", *features(demo_repo)]).encode()
    return [head] + [",".join([f"r{i}", *map(repr, data[i].tolist())]).encode() for i in range(rows)], data


def expected(demo_repo: Path, data: np.ndarray, rows: list[int]) -> list[str]:
    model = forwardpass.load("breast-cancer", repository=demo_repo)
    names = features(demo_repo)
    return [a["label"] for a in model.predict([dict(zip(names, data[i].tolist())) for i in rows])]


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exit 2 and one 'error:' line, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


def test_malformed_csv_lines_are_row_errors_and_every_other_row_keeps_its_number(demo_repo, tmp_path):
    rows = 30_000  # ~6.7 MB: more than one 4 MiB read block, so bad lines sit in two of them
    lines, data = csv_lines(demo_repo, rows)
    bad = {
        3: b",extra",  # one field too many (appended)
        4: None,  # too few fields (cut below)
        10: None,  # an unterminated quote
        11: None,  # invalid UTF-8 in the key
        12: None,  # an empty line
        20: None,  # the two lines of a quoted field with a newline inside
        21: None,
        25_000: b",1,2",  # in the second block
        25_001: None,
    }
    lines[1 + 3] += bad[3]
    lines[1 + 4] = b",".join(lines[1 + 4].split(b",")[:5])
    lines[1 + 10] = b'"' + lines[1 + 10]
    lines[1 + 11] = lines[1 + 11].replace(b"r11", b"r\xff11")
    lines[1 + 12] = b""
    lines[1 + 20] = lines[1 + 20].split(b",")[0] + b',"a note'  # key, then a quote that closes on the next line
    lines[1 + 21] = b'on two lines",' + lines[1 + 21].split(b",", 2)[2]
    lines[1 + 25_000] += bad[25_000]
    lines[1 + 25_001] = lines[1 + 25_001].replace(b"r25001,", b"r25001,\xc3(")
    src = tmp_path / "rows.csv"
    src.write_bytes(b"\r\n".join(lines))  # CRLF, and no newline after the last row
    out = tmp_path / "out"
    done = cli("breast-cancer", src, "-o", out, "--id-column", "key", "--chunk-rows", "7000", "-r", demo_repo)
    assert done.returncode == 0, done.stderr
    good = [i for i in range(rows) if i not in bad]
    assert f"{len(good):,} rows ok, {len(bad)} failed" in " ".join(done.stdout.split())
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == sorted(bad)  # the data-row index: file line - 2
    why = {e["row"]: e["error"] for e in errors}
    assert all(why[r].startswith(f"line {r + 2}:") for r in bad), why
    assert "expected 31 fields" in why[3] and "got 32" in why[3] and "got 5" in why[4]
    assert "quote" in why[10] and "quote" in why[20] and "UTF-8" in why[11] and "UTF-8" in why[25_001]
    assert "empty" in why[12]
    table = pq.read_table(out).sort_by("row")
    assert table.column("row").to_pylist() == good
    assert table.column("key").to_pylist() == [f"r{i}" for i in good]  # every row kept its own number
    assert table.column("label").to_pylist() == expected(demo_repo, data, good)


def test_jsonl_lines_with_invalid_utf8_are_row_errors(demo_repo, tmp_path):
    lines, data = csv_lines(demo_repo, 6)
    names = features(demo_repo)
    rows = [json.dumps({"key": f"r{i}", **dict(zip(names, data[i].tolist()))}).encode() for i in range(6)]
    rows[2] = rows[2].replace(b'"r2"', b'"r\xff2"')
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"\n".join(rows) + b"\n")
    done = cli("breast-cancer", src, "-o", tmp_path / "out", "--id-column", "key", "-r", demo_repo)
    assert done.returncode == 0, done.stderr
    errors = [json.loads(line) for line in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [2] and "UTF-8" in errors[0]["error"]
    assert pq.read_table(tmp_path / "out").sort_by("row").column("key").to_pylist() == ["r0", "r1", "r3", "r4", "r5"]


def test_a_header_without_a_required_feature_fails_at_the_start_naming_it(demo_repo, tmp_path):
    lines, _ = csv_lines(demo_repo, 5)
    lines[0] = lines[0].replace(b",mean perimeter,", b",perimeter,")
    src = tmp_path / "rows.csv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    line = one_error_line(cli("breast-cancer", src, "-o", tmp_path / "out", "-r", demo_repo))
    assert "mean perimeter" in line and "default" in line
    assert not (tmp_path / "out").exists()  # nothing started


def test_an_output_path_that_is_a_file_is_one_line_and_exit_2(demo_repo, tmp_path):
    lines, _ = csv_lines(demo_repo, 5)
    src = tmp_path / "rows.csv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    target = tmp_path / "taken"
    target.write_text("not a folder")
    line = one_error_line(cli("breast-cancer", src, "-o", target, "-r", demo_repo))
    assert str(target) in line and "file" in line
    assert target.read_text() == "not a folder"


def test_a_corrupt_manifest_or_input_file_is_one_line_and_exit_2(demo_repo, tmp_path):
    lines, _ = csv_lines(demo_repo, 5)
    src = tmp_path / "rows.csv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert cli("breast-cancer", src, "-o", out, "-r", demo_repo).returncode == 0
    manifest = out / "_manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])  # truncated
    line = one_error_line(cli("breast-cancer", src, "-o", out, "-r", demo_repo))
    assert "_manifest.json" in line
    manifest.write_text('{"job": 1, "parts": []}')  # JSON, but not a manifest
    assert "_manifest.json" in one_error_line(cli("breast-cancer", src, "-o", out, "-r", demo_repo))

    broken = tmp_path / "rows.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    assert "rows.parquet" in one_error_line(cli("digits", broken, "-o", tmp_path / "o2", "-r", demo_repo))


def test_resume_redoes_a_part_that_is_missing_truncated_or_changed(demo_repo, tmp_path):
    rows = 10_000
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16).astype(np.float32)[np.arange(rows) % 1797]
    src = tmp_path / "rows.parquet"
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    pq.write_table(pa.table({"id": np.arange(rows), "input": column}), src)
    out = tmp_path / "out"
    args = ("digits", src, "-o", out, "--id-column", "id", "--chunk-rows", "1000", "-r", demo_repo)
    assert cli(*args).returncode == 0
    (out / "part-00002.parquet").unlink()
    part = out / "part-00005.parquet"
    part.write_bytes(part.read_bytes()[:-100])  # truncated
    other = out / "part-00007.parquet"
    same_size = bytearray(other.read_bytes())
    same_size[len(same_size) // 2] ^= 0xFF  # one byte changed, size kept
    other.write_bytes(bytes(same_size))
    (out / "_part_errors" / "part-00008.jsonl").unlink()
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    said = " ".join(rerun.stdout.split())
    assert "10,000 rows ok" in said and "6 parts from an earlier run" in said and "4 parts redone" in said, said
    table = pq.read_table(out).sort_by("id")
    assert table.column("id").to_pylist() == list(range(rows))  # every row once
    model = forwardpass.load("digits", repository=demo_repo)
    assert table.column("label").to_pylist() == list(model.predict({"input": x}).columns()["label"])


def test_an_input_edit_that_keeps_size_and_mtime_is_another_job(demo_repo, tmp_path):
    lines, _ = csv_lines(demo_repo, 50)
    src = tmp_path / "rows.csv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert cli("breast-cancer", src, "-o", out, "-r", demo_repo).returncode == 0
    before = os.stat(src)
    text = bytearray(src.read_bytes())
    at = text.index(b"\nr7,") + 4
    text[at] = ord("2") if text[at] != ord("2") else ord("3")  # one digit of row 7, same length
    src.write_bytes(bytes(text))
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(src).st_size == before.st_size and os.stat(src).st_mtime_ns == before.st_mtime_ns
    line = one_error_line(cli("breast-cancer", src, "-o", out, "-r", demo_repo))
    assert "another job" in line


def test_the_ray_engine_names_a_malformed_csv_line_in_one_error(demo_repo, tmp_path, ray_cluster, cli):
    """The command's entry point in this process (``cli`` fixture), on the session's Ray cluster."""
    lines, _ = csv_lines(demo_repo, 10)
    lines[1 + 2] += b",extra"
    src = tmp_path / "rows.csv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    done = cli("batch", "breast-cancer", str(src), "-o", str(tmp_path / "out"), "--engine", "ray", "--num-cpus", "2",
               "-r", str(demo_repo))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = [ln for ln in done.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error:") and "line 4: expected 31 fields" in last and "local engine" in last
