"""Batch inference: forwardpass batch against raw ONNX Runtime and a naive pandas loop, digits model.

    python bench/batch.py [--rows 2000000] [--batch-size 1024]

Writes a Parquet file of ``rows`` digit vectors (and the same as CSV for the naive loop), then
times: raw ONNX Runtime over the in-memory matrix in a tight loop at the same batch size (the
ceiling: no reading, no writing), forwardpass batch (Parquet in, Parquet out, in a child process
so its peak RSS is its own), and a naive loop (pandas.read_csv of the whole file, session.run per
batch, DataFrame.to_csv). Targets (issue 7): >= 0.7x raw and >= 3x naive; peak RSS <= 1 GiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
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
    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; digits, {args.rows:,} rows, batch {args.batch_size}\n")

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model.runtime.path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    start = time.perf_counter()
    for i in range(0, args.rows, args.batch_size):
        session.run(None, {name: x[i : i + args.batch_size]})
    raw = args.rows / (time.perf_counter() - start)

    code = ("from forwardpass import batch; import time; t = time.perf_counter(); "
            f"batch.run('digits', {str(folder / 'rows.parquet')!r}, {str(folder / 'out')!r}, id_columns=['id'], "
            f"batch_size={args.batch_size}); print(time.perf_counter() - t); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, peak = done.stdout.split()[-2:]
    ours, peak_mib = args.rows / float(seconds), int(peak) / 1024

    start = time.perf_counter()
    frame = pd.read_csv(folder / "rows.csv")
    matrix = frame[[f"p{i}" for i in range(64)]].to_numpy(np.float32)
    labels = []
    for i in range(0, len(matrix), args.batch_size):
        out = session.run(None, {name: matrix[i : i + args.batch_size]})[0]
        labels.append(out if out.ndim == 1 else out.argmax(1))
    frame[["id"]].assign(label=np.concatenate(labels)).to_csv(folder / "naive.csv", index=False)
    naive = args.rows / (time.perf_counter() - start)

    print(f"{'raw ONNX Runtime (in memory, 1 thread)':<44}{raw:>12,.0f} rows/s")
    print(f"{'forwardpass batch (Parquet -> Parquet)':<44}{ours:>12,.0f} rows/s  peak RSS {peak_mib:.0f} MiB")
    print(f"{'naive pandas read_csv + run + to_csv':<44}{naive:>12,.0f} rows/s")
    print(f"\nforwardpass = {ours / raw:.2f}x raw (target >= 0.7), {ours / naive:.1f}x naive (target >= 3); "
          f"peak RSS {peak_mib:.0f} MiB (target <= 1024)")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
