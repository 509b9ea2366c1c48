"""`forwardpass import gguf FILE --name NAME`: a GGUF language model -> a repository model folder.

    models/smollm2/
      model.yaml            task: generation, context length, stop tokens, special token ids
      tokenizer.json        rebuilt from the GGUF metadata (generation/tokenizer.py)
      chat_template.jinja   the template stored in the GGUF
      1/model.onnx          the decoder graph (convert/gguf_decoder.py), weights in model.onnx.data
      1/prefill.onnx        the same graph for prompts: fp32 activations in the linears (faster than int8
                            for many rows on AVX2: bench/generate.py), weights in prefill.onnx.data
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from forwardpass._deps import require
from forwardpass.convert.gguf_decoder import build_decoder
from forwardpass.generation.gguf_file import GGUFFile
from forwardpass.generation.tokenizer import tokenizer_from_gguf
from forwardpass.repository import check_name


def import_gguf(path: str | Path, name: str, repository: str | Path, *, accuracy_level: int = 4,
                max_context: int = 2048, prefill_accuracy_level: int | None = 1) -> Path:  # fmt: skip
    """Convert ``path`` into ``repository/name`` (a new version if the model exists); returns the folder."""
    onnx = require("onnx", "llm", "converting GGUF models")
    check_name(name)
    source = GGUFFile.open(path)
    hp = source.hparams
    context = min(max_context, hp.n_ctx)
    folder = Path(repository) / name
    folder.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    version = max(versions, default=0) + 1
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    try:
        decoder = build_decoder(source, accuracy_level=accuracy_level, max_positions=context)
        onnx.save(decoder, str(staging / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        if prefill_accuracy_level is not None and prefill_accuracy_level != accuracy_level:
            prefill = build_decoder(source, accuracy_level=prefill_accuracy_level, max_positions=context,
                                    head_accuracy_level=accuracy_level)  # fmt: skip
            onnx.save(prefill, str(staging / "prefill.onnx"), save_as_external_data=True, location="prefill.onnx.data")
        os.replace(staging, folder / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tokenizer_from_gguf(source).save(str(folder / "tokenizer.json"))
    template = source.value("tokenizer.chat_template", None)
    if template:
        (folder / "chat_template.jinja").write_text(str(template), encoding="utf-8")
    eos = int(source.value("tokenizer.ggml.eos_token_id"))
    stop = sorted({eos, *(int(t) for t in [source.value("tokenizer.ggml.eot_token_id", eos)])})
    config = {
        "task": "generation",
        "description": f"{source.value('general.name', name)} ({hp.n_layer} layers, {hp.n_embd} wide), "
                       f"converted from {Path(path).name} by forwardpass",  # fmt: skip
        "post": {"kind": "passthrough"},
        "generation": {
            "context_length": context,
            "bos_token_id": int(source.value("tokenizer.ggml.bos_token_id", -1)),
            "add_bos_token": bool(source.value("tokenizer.ggml.add_bos_token", False)),
            "stop_token_ids": stop,
            "chat_template": "chat_template.jinja" if template else None,
            "n_layer": hp.n_layer, "n_head_kv": hp.n_head_kv, "head_dim": hp.head_dim, "n_vocab": hp.n_vocab,
        },
    }  # fmt: skip
    tmp = folder / ".model.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    os.replace(tmp, folder / "model.yaml")
    return folder
