"""Batch inference: forwardpass batch against raw ONNX Runtime (and a naive pandas loop).

    python bench/batch.py [--rows 2000000] [--batch-size 1024] [--images 2000] [--image-batch 8]
                          [--rounds 3] [--only digits|cnn]

digits: writes a Parquet file of ``rows`` digit vectors (and the same as CSV for the naive loop),
then times raw ONNX Runtime over the in-memory matrix in a tight loop at the same batch size (the
ceiling: no reading, no writing) and forwardpass batch (Parquet in, Parquet out, in a child process
so its peak RSS is its own; the job's own wall time from its summary) in ``rounds`` interleaved
rounds, medians reported, and once a naive loop (pandas.read_csv of the whole file, session.run per
batch, DataFrame.to_csv). Targets (issue 7): >= 0.7x raw and >= 3x naive; peak RSS <= 1 GiB.

cnn: the ResNet-18-shaped CNN of bench/cnn.py (random weights) classifying ``images`` JPEG files
(256x256, resized and center-cropped to 224 with ImageNet mean/std) from a folder to Parquet,
against raw ONNX Runtime at the same batch size on already-decoded tensors in memory, both with
every core. Target: >= 0.9x raw.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cnn import write as write_cnn  # noqa: E402
from engine import cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=2_000)
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved raw/forwardpass rounds (digits)")
    parser.add_argument("--only", choices=["digits", "cnn"])
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores\n")
    if args.only != "cnn":
        digits(args)
    if args.only != "digits":
        cnn(args)


def digits(args: argparse.Namespace) -> None:
    import onnxruntime as ort
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    import forwardpass

    model = forwardpass.load("digits")
    folder = Path(tempfile.mkdtemp(prefix="fp-batch-"))
    x = (load_digits().data / 16).astype(np.float32)[np.arange(args.rows) % 1797]
    pq.write_table(pa.table({"id": np.arange(args.rows), "input": pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), 64)}), folder / "rows.parquet", row_group_size=65536)  # fmt: skip
    pd.DataFrame(x, columns=[f"p{i}" for i in range(64)]).assign(id=np.arange(args.rows)).to_csv(folder / "rows.csv", index=False)
    print(f"digits, {args.rows:,} rows, batch {args.batch_size}")

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model.runtime.path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def raw_round() -> float:
        start = time.perf_counter()
        for i in range(0, args.rows, args.batch_size):
            session.run(None, {name: x[i : i + args.batch_size]})
        return args.rows / (time.perf_counter() - start)

    code = ("from forwardpass import batch; "
            f"s = batch.run('digits', {str(folder / 'rows.parquet')!r}, {str(folder / 'out')!r}, id_columns=['id'], "
            f"batch_size={args.batch_size}, progress=False); print(s.seconds); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")  # fmt: skip

    def ours_round() -> tuple[float, float]:  # (rows/s, peak RSS MiB); a fresh output folder each time
        shutil.rmtree(folder / "out", ignore_errors=True)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seconds, peak = done.stdout.split()[-2:]
        return args.rows / float(seconds), int(peak) / 1024

    raws, ours_peaks = [], []
    for _ in range(args.rounds):  # interleaved, so a slow minute of this machine hits both
        raws.append(raw_round())
        ours_peaks.append(ours_round())
    raw, ours = statistics.median(raws), statistics.median(r for r, _ in ours_peaks)
    peak_mib = max(p for _, p in ours_peaks)
    print(f"rounds: raw {', '.join(f'{r:,.0f}' for r in raws)}; forwardpass "
          f"{', '.join(f'{r:,.0f}' for r, _ in ours_peaks)} rows/s")  # fmt: skip

    start = time.perf_counter()
    frame = pd.read_csv(folder / "rows.csv")
    matrix = frame[[f"p{i}" for i in range(64)]].to_numpy(np.float32)
    labels = []
    for i in range(0, len(matrix), args.batch_size):
        out = session.run(None, {name: matrix[i : i + args.batch_size]})[0]
        labels.append(out if out.ndim == 1 else out.argmax(1))
    frame[["id"]].assign(label=np.concatenate(labels)).to_csv(folder / "naive.csv", index=False)
    naive = args.rows / (time.perf_counter() - start)

    print(f"{'raw ONNX Runtime (in memory, 1 thread)':<44}{raw:>12,.0f} rows/s  (median)")
    print(f"{'forwardpass batch (Parquet -> Parquet)':<44}{ours:>12,.0f} rows/s  (median) peak RSS {peak_mib:.0f} MiB")
    print(f"{'naive pandas read_csv + run + to_csv':<44}{naive:>12,.0f} rows/s")
    print(f"\nforwardpass = {ours / raw:.2f}x raw (target >= 0.7), {ours / naive:.1f}x naive (target >= 3); "
          f"peak RSS {peak_mib:.0f} MiB (target <= 1024)\n")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)


def cnn(args: argparse.Namespace) -> None:
    import onnxruntime as ort
    import PIL.Image
    import pyarrow.parquet as pq
    import yaml

    from forwardpass import batch

    folder = Path(tempfile.mkdtemp(prefix="fp-batch-cnn-"))
    repo, images = folder / "repo", folder / "images"
    write_cnn(repo / "cnn" / "1" / "model.onnx")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (repo / "cnn" / "model.yaml").write_text(yaml.safe_dump({
        "task": "classification", "description": "ResNet-18-shaped, random weights",
        "labels": [f"class{i}" for i in range(1000)],
        "pre": {"kind": "image", "resize": 256, "center_crop": [224, 224], "mean": mean, "std": std},
        "post": {"kind": "classification", "output": "logits", "logits": True},
    }))  # fmt: skip
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):  # smooth random pictures: coarse noise scaled up, so JPEG has real work
        coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        PIL.Image.fromarray(coarse).resize((256, 256), PIL.Image.BILINEAR).save(images / f"{i:05d}.jpg", quality=90)
    print(f"cnn (ResNet-18-shaped), {args.images:,} JPEG images 256x256 -> 224, batch {args.image_batch}")

    session = ort.InferenceSession(str(repo / "cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = rng.random((args.image_batch, 3, 224, 224), dtype=np.float32)
    session.run(None, {"input": x})
    start = time.perf_counter()
    for _ in range(0, args.images, args.image_batch):
        session.run(None, {"input": x})
    raw = args.images / (time.perf_counter() - start)

    summary = batch.run("cnn", images, folder / "out", repository=repo, batch_size=args.image_batch, progress=False)
    ours = args.images / summary.seconds
    assert summary.rows_ok == args.images and pq.read_table(folder / "out").num_rows == args.images

    print(f"{'raw ONNX Runtime (decoded tensors in memory)':<44}{raw:>12,.1f} images/s")
    print(f"{'forwardpass batch (JPEG folder -> Parquet)':<44}{ours:>12,.1f} images/s")
    print(f"\nforwardpass = {ours / raw:.2f}x raw (target >= 0.9)")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
