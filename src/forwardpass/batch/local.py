"""The local engine: read, predict and write overlap on threads joined by bounded queues.

    reader thread ──chunks──> predictor thread(s) ──(index, table, errors)──> writer thread

ONNX Runtime, pyarrow and Pillow release the GIL in their heavy parts, so the stages run at once.
Where pre-processing happens depends on how the model uses the cores:

- a small model (one ONNX Runtime thread): one predictor per core, each decoding and running
  its own chunks; the cores work on different chunks.
- a big model (one predictor whose ONNX Runtime uses every core): the reader thread also decodes
  and pre-processes, so the next chunk's images are ready when the forward pass finishes this one.

Chunks can finish out of order with several predictors; each is committed under its own index,
so order does not matter for the output or for resuming.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

from forwardpass.batch import BatchAborted, Summary
from forwardpass.batch.io import Chunk, PartWriter, open_source
from forwardpass.batch.predict import ChunkPredictor, check_columns
from forwardpass.pipeline import TABLE, BatchDefaults
from forwardpass.runtime.onnx import available_cores
from forwardpass.tasks import generative

_DONE = object()
_GENERATION = BatchDefaults(batch_size=8, chunk_rows=64, ray_rows=8)  # sequences: continuous batching's slots


def run_local(model: Any, input: str | Path, output: str | Path, *, fmt: str, batch_size: int | None,
              chunk_rows: int | None, id_columns: list[str] | None, max_errors: int | None, top_k: int,
              progress: bool, max_tokens: int) -> Summary:  # fmt: skip
    started = time.perf_counter()  # the job's time includes hashing the input and checking earlier parts
    generation = generative(model.config)
    source = open_source(input, chunk_rows or 1, generation=generation)
    columns = source.column_names()
    if not generation:
        check_columns(model, source.path, columns, id_columns or [])
    if generation:
        defaults = _GENERATION
    elif model.pre.per_instance and _feeds_tensor(model, columns):
        defaults = TABLE  # images as a list column named after the input: no decoding, table-sized chunks
    else:
        defaults = model.pre.batch  # the pre-processing kind's own (images: 32 per pass, 256 per part)
    batch_size = batch_size or defaults.batch_size
    source.chunk_rows = chunk_rows = chunk_rows or defaults.chunk_rows
    writer = PartWriter(output, fmt)  # a bad output path or manifest fails here, before the input is hashed
    job = {"input": source.fingerprint(), "model": model.name, "version": model.version, "chunk_rows": chunk_rows,
           "format": fmt, "id_columns": id_columns or [], "top_k": top_k}  # fmt: skip
    if generation:
        job["max_tokens"] = max_tokens
    writer.begin(job)
    done = writer.done
    ok, failed = writer.counts()
    if generation:
        from forwardpass.batch.generate import GenerationPredictor

        predictors: list[Any] = [GenerationPredictor(model, id_columns=id_columns, max_tokens=max_tokens)]
    else:
        threads = model.runtime.threads
        count = available_cores() if threads == 1 else 1
        predictors = [ChunkPredictor(model, id_columns=id_columns, batch_size=batch_size, top_k=top_k)
                      for _ in range(count)]  # fmt: skip
    early = len(predictors) == 1 and isinstance(predictors[0], ChunkPredictor)  # decode in the reader
    total = source.total_rows()
    bar = _Progress(total, ok + failed) if progress else None

    chunks: queue.Queue[Any] = queue.Queue(maxsize=2)
    results: queue.Queue[Any] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            for chunk in source.chunks(skip=done):
                item = predictors[0].prepare(chunk) if early else chunk
                while not stop.is_set():
                    try:
                        chunks.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:
            failure.append(exc)
            stop.set()
        finally:
            for _ in predictors:
                _put(chunks, _DONE, stop)

    def predict(predictor: Any) -> None:
        try:
            while not stop.is_set():
                try:
                    item = chunks.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                if early:
                    table, errors = predictor.finish(item)
                    item = item.chunk
                else:
                    table, errors = predictor.predict(item)
                _put(results, (item, table, errors), stop)
        except BaseException as exc:
            failure.append(exc)
            stop.set()
        finally:
            _put(results, _DONE, stop)

    workers = [threading.Thread(target=read, name="batch-read", daemon=True)]
    workers += [threading.Thread(target=predict, args=(p,), name=f"batch-predict-{i}", daemon=True)
                for i, p in enumerate(predictors)]  # fmt: skip
    for w in workers:
        w.start()
    finished = 0
    try:
        while finished < len(predictors):  # the writer runs here, on the calling thread
            try:
                item = results.get(timeout=0.1)
            except queue.Empty:
                if failure:
                    break
                continue
            if item is _DONE:
                finished += 1
                continue
            chunk, table, errors = item
            writer.commit(chunk.index, table, errors)
            ok, failed = ok + table.num_rows, failed + len(errors)
            if bar:
                bar.advance(len(chunk), failed)
            if max_errors is not None and failed > max_errors:
                raise BatchAborted(f"{failed} rows failed, more than --max-errors {max_errors}; see "
                                   f"{Path(output) / '_part_errors'}; rerun the same command to continue")  # fmt: skip
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
        if bar:
            bar.close()
        for p in predictors:
            close = getattr(p, "close", None)
            if close:
                close()
    if failure:
        raise failure[0]
    errors_file = writer.finish()
    return Summary(ok, failed, time.perf_counter() - started, Path(output), errors_file, resumed_parts=len(done),
                   redone=writer.redone)  # fmt: skip


def _feeds_tensor(model: Any, columns: list[str]) -> bool:
    """Does a Parquet/CSV input carry the model's one tensor input as a column of that name?"""
    inputs = getattr(model, "inputs", [])
    return len(inputs) == 1 and inputs[0].name in columns


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    """Put, unless the job is stopping: then the consumer is gone (or leaves on ``stop`` without reading
    more), and waiting for room in a full queue would hold the job's end for the threads' join timeout."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                return


class _Progress:
    """rich progress bar: rows done, rows/s, ETA, failures."""

    def __init__(self, total: int | None, already: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(),
                                 TextColumn("[red]{task.fields[failed]} failed"), transient=False)  # fmt: skip
        self.task = self.progress.add_task("rows", total=total, completed=already, rate="-", failed=0)
        self.started, self.done = time.perf_counter(), 0
        self.progress.start()

    def advance(self, rows: int, failed: int) -> None:
        self.done += rows
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=rows, rate=f"{rate:,.0f}", failed=failed)

    def close(self) -> None:
        self.progress.stop()


__all__ = ["Chunk", "run_local"]
