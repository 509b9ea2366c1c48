"""The Ray engine: Ray Data reads the input, an actor pool holding the model predicts, Parquet comes out.

    ray.data.read_parquet(input)                       # or read_csv / read_json / image paths
        .map_batches(_Predict, concurrency=N, ...)     # each actor loads the Model once
        -> good rows to OUTPUT/*.parquet, bad rows to OUTPUT/_errors.jsonl

It runs on a local Ray cluster started here (``num_cpus``, default all cores) or on an existing
one (``address``); the actors load the model from ``repository``, which must be readable from
every node (a shared path) for a multi-node cluster. Predictions are computed by the same
ChunkPredictor as the local engine, so both engines give the same rows and the same values.
Rows are identified by their id columns (``--id-column``): Ray Data has no global row number.
The output is not resumable (Ray writes it in one pass); use the local engine for that. Ray Data's CSV
and JSON readers stop at a malformed line; the job then fails with one error naming the first such lines
(found by the local engine's reader), not a traceback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import orjson

from forwardpass._deps import require
from forwardpass.batch import Summary
from forwardpass.batch.io import Chunk, open_source, output_folder
from forwardpass.batch.predict import check_columns
from forwardpass.errors import InvalidInput
from forwardpass.runtime.onnx import available_cores
from forwardpass.tasks import generative


class _Predict:
    """A Ray actor: loads the model once, predicts pyarrow batches; bad rows come back with an ``error``."""

    def __init__(self, name: str, version: int, repository: str, id_columns: list[str], batch_size: int, top_k: int):
        import forwardpass
        from forwardpass.batch.predict import ChunkPredictor

        model = forwardpass.load(name, repository=repository, version=version)
        self.predictor = ChunkPredictor(model, id_columns=id_columns, batch_size=batch_size, top_k=top_k)
        self.id_columns = id_columns

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        out, errors = self.predictor.predict(Chunk(0, 0, table))
        out = out.drop_columns(["row"]).append_column("error", pa.nulls(out.num_rows, pa.string()))
        if not errors:
            return out
        bad = pa.table({**{c: [e.get(c) for e in errors] for c in self.id_columns},
                        "error": [e["error"] for e in errors]})  # fmt: skip
        return pa.concat_tables([out, bad], promote_options="default")


def _malformed(source: Any) -> None:
    """After Ray failed on a CSV or JSONL input: one error naming its first malformed lines, if it has any."""
    if source.kind not in ("csv", "jsonl"):
        return
    for chunk in source.chunks():  # our reader, which goes on past bad lines; only run once Ray has failed
        if chunk.bad:
            first = "; ".join(list(chunk.bad.values())[:3])
            raise InvalidInput(("input",), f"{source.path}: {first}; the Ray engine's reader stops at a malformed "
                               "line: fix it, or run the local engine, which writes such lines to _errors.jsonl "
                               "and goes on") from None  # fmt: skip


def run_ray(model: Any, input: str | Path, output: str | Path, *, fmt: str, batch_size: int | None,
            id_columns: list[str] | None, top_k: int, repository: str | Path | None, address: str | None,
            num_cpus: int | None) -> Summary:  # fmt: skip
    ray = require("ray", "ray", "the Ray batch engine")
    if fmt != "parquet":
        raise InvalidInput(("format",), "the Ray engine writes Parquet", fmt)
    if generative(model.config):
        raise InvalidInput(("engine",), "generation models run on the local engine (continuous batching)", "ray")
    from forwardpass import default_repository

    repo = str(Path(repository or default_repository()).resolve())
    source = open_source(input, 1 << 16)
    check_columns(model, source.path, source.column_names(), id_columns or [])
    folder = output_folder(output)
    started = time.perf_counter()
    cpus = num_cpus or available_cores()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    data = ray.data
    data.DataContext.get_current().enable_progress_bars = False
    # actors reserve half a CPU per thread and readers a quarter: Ray Data's file-listing task wants a whole
    # CPU, and an actor pool that reserved every CPU left none for it (the job waited forever, measured)
    light = {"num_cpus": 0.25}  # named remote parameters (ray_remote_args is deprecated)
    if source.kind == "parquet":
        ds = data.read_parquet(source.path, **light)
    elif source.kind == "csv":
        ds = data.read_csv(source.path, **light)
    elif source.kind == "jsonl":
        ds = data.read_json(source.path, lines=True, **light)
    else:
        ds = data.from_items([{"path": p} for p in source.files()])
    threads = max(1, model.runtime.threads)
    actors = max(1, int(ray.available_resources().get("CPU", cpus)) // threads)
    size = batch_size or model.pre.batch.ray_rows  # the pre-processing kind's (images: 32, tables: 4096)
    quiet = logging.getLogger("ray.data")  # it logs a failed task's traceback itself; the exception carries it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        args = (model.name, model.version, repo, id_columns or [], size, top_k)
        scored = ds.map_batches(_Predict, fn_constructor_args=args, batch_format="pyarrow", batch_size=size,
                                compute=data.ActorPoolStrategy(size=actors), num_cpus=0.5 * threads).materialize()
    except Exception:
        _malformed(source)  # Ray Data's CSV and JSON readers stop at a malformed line: name it
        raise
    finally:
        quiet.setLevel(level)
    good = scored.filter(lambda row: row["error"] is None)
    bad = scored.filter(lambda row: row["error"] is not None)
    good.drop_columns(["error"]).write_parquet(str(folder))
    errors = bad.take_all()
    lines = b"".join(orjson.dumps({k: v for k, v in e.items() if v is not None or k in (id_columns or [])}) + b"\n"
                     for e in errors)  # fmt: skip
    (folder / "_errors.jsonl").write_bytes(lines)
    ok = good.count()
    return Summary(ok, len(errors), time.perf_counter() - started, folder, folder / "_errors.jsonl")

