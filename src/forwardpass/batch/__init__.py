"""Batch inference over large files: chunked, resumable, bounded memory, per-row errors, local or on Ray.

    from forwardpass import batch
    summary = batch.run("digits", "rows.parquet", "out/", id_columns=["id"])
    summary.rows_ok, summary.rows_failed, summary.seconds

The output folder holds ``part-NNNNN.parquet`` (or .csv / .jsonl) files, ``_errors.jsonl`` (one
record per bad row: its row number, id columns and the reason) and ``_manifest.json``. Running the
same command again after a crash continues from the last committed part (batch/io.py says how), after
checking each committed part against the size and SHA-256 the manifest recorded (one that is missing or
changed is done again), and only if the input's content hash is the one the manifest recorded.

Local engine (batch/local.py): a reader thread, one or more predictor threads (as many as cores for
models that run on one intra-op thread, else one that uses them all) and a writer thread, joined by
bounded queues: memory is a few chunks, not the file. Ray engine (batch/ray_engine.py): Ray Data
reads, an actor pool holding the model predicts, Parquet is written per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwardpass.errors import BatchAborted  # noqa: F401 (raised by the engines, lives in errors.py)


@dataclass
class Summary:
    """What a batch job did."""

    rows_ok: int
    rows_failed: int
    seconds: float
    output: Path
    errors_file: Path | None
    resumed_parts: int = 0
    redone: list[str] = field(default_factory=list)  # earlier parts done again: "part-00003.parquet: missing"

    @property
    def rows_per_second(self) -> float:
        return (self.rows_ok + self.rows_failed) / self.seconds if self.seconds > 0 else 0.0


def run(model: str | Any, input: str | Path, output: str | Path, *, engine: str = "local", fmt: str = "parquet",
        batch_size: int | None = None, chunk_rows: int | None = None, id_columns: list[str] | None = None,
        max_errors: int | None = None, top_k: int = 0, repository: str | Path | None = None,
        ray_address: str | None = None, num_cpus: int | None = None, progress: bool = False,
        max_tokens: int = 64) -> Summary:  # fmt: skip
    """Score ``input`` with ``model`` (a name in the repository, or a loaded Model) into ``output``."""
    from forwardpass import load

    loaded = load(model, repository=repository) if isinstance(model, str) else model
    if engine == "ray":
        from forwardpass.batch.ray_engine import run_ray

        return run_ray(loaded, input, output, fmt=fmt, batch_size=batch_size, id_columns=id_columns, top_k=top_k,
                       repository=repository, address=ray_address, num_cpus=num_cpus)  # fmt: skip
    if engine != "local":
        from forwardpass.errors import InvalidInput

        raise InvalidInput(("engine",), "expected local or ray", engine)
    from forwardpass.batch.local import run_local

    return run_local(loaded, input, output, fmt=fmt, batch_size=batch_size, chunk_rows=chunk_rows,
                     id_columns=id_columns, max_errors=max_errors, top_k=top_k, progress=progress,
                     max_tokens=max_tokens)  # fmt: skip


__all__ = ["BatchAborted", "Summary", "run"]
