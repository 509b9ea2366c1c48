"""`forwardpass import gguf FILE --name NAME`: a GGUF language model -> a repository model folder.

    models/smollm2/
      model.yaml            task: generation, context length, stop tokens, special token ids
      tokenizer.json        rebuilt from the GGUF metadata (generation/tokenizer.py)
      chat_template.jinja   the template stored in the GGUF
      1/model.onnx          the decoder graph (convert/gguf_decoder.py), weights in model.onnx.data

One graph serves prompts and decode steps: a second prompt graph (``prefill_accuracy_level=1``: fp32
activations, faster for many rows on AVX2-only CPUs) holds a second copy of the weights (+107 MiB RSS),
and on AVX-512 VNNI the int8 graph reads prompts faster anyway (597 vs 518 tok/s at 512 tokens).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from forwardpass._deps import require
from forwardpass.convert.gguf_decoder import build_decoder
from forwardpass.generation.gguf_file import GGUFError, GGUFFile
from forwardpass.generation.tokenizer import tokenizer_from_gguf
from forwardpass.repository import check_name


def import_gguf(path: str | Path, name: str, repository: str | Path, *, accuracy_level: int = 4,
                max_context: int = 2048, prefill_accuracy_level: int | None = None,
                kernels: str = "auto") -> Path:  # fmt: skip
    """Convert ``path`` into ``repository/name`` (a new version if the model exists); returns the folder.

    ``kernels``: "forwardpass" (forwardpass's own Q4_1 linears and attention, built here with the C compiler),
    "onnxruntime" (ONNX Runtime's operators only) or "auto": forwardpass's where they build and fit (see
    _forwardpass_kernels_unfit).
    """
    onnx = require("onnx", "llm", "converting GGUF models")
    check_name(name)
    source = GGUFFile.open(path)  # bounded by the file's size; hyper-parameters checked against the tensors
    hp = source.hparams
    context = min(max_context, hp.n_ctx)
    unfit = _forwardpass_kernels_unfit(hp, prefill_accuracy_level)
    if kernels == "auto":
        from forwardpass import kernels as own

        kernels = "forwardpass" if not unfit and own.available() else "onnxruntime"
    elif kernels == "forwardpass" and unfit:
        raise GGUFError(f"{path}: forwardpass's kernels do not fit this import ({unfit}); use --kernels onnxruntime")
    # everything read from the metadata is checked before the (slow) conversion, so a bad file leaves nothing behind
    tokenizer = tokenizer_from_gguf(source)
    template = source.value("tokenizer.chat_template", None)
    if template is not None and not isinstance(template, str):
        raise GGUFError(f"{path}: metadata 'tokenizer.chat_template' is not a string")
    eos = _token_id(source, "tokenizer.ggml.eos_token_id")
    stop = sorted({eos, _token_id(source, "tokenizer.ggml.eot_token_id", eos)})
    add_bos = source.value("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.add_bos_token' is {add_bos!r:.60}; expected true or false")
    description = source.value("general.name", name)
    config = {
        "task": "generation",
        "description": f"{description if isinstance(description, str) else name} ({hp.n_layer} layers, {hp.n_embd} "
                       f"wide), converted from {Path(path).name} by forwardpass",  # fmt: skip
        "post": {"kind": "passthrough"},
        "generation": {
            "context_length": context,
            "bos_token_id": _token_id(source, "tokenizer.ggml.bos_token_id", -1),
            "add_bos_token": add_bos,
            "stop_token_ids": stop,
            "chat_template": "chat_template.jinja" if template else None,
            "n_layer": hp.n_layer, "n_head_kv": hp.n_head_kv, "head_dim": hp.head_dim, "n_vocab": hp.n_vocab,
        },
    }  # fmt: skip
    folder = Path(repository) / name
    folder.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name) for p in folder.iterdir() if p.name.isascii() and p.name.isdigit()]
    version = max(versions, default=0) + 1
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    try:
        decoder = build_decoder(source, accuracy_level=accuracy_level, max_positions=context, kernels=kernels)
        onnx.save(decoder, str(staging / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        if prefill_accuracy_level is not None and prefill_accuracy_level != accuracy_level:
            prefill = build_decoder(source, accuracy_level=prefill_accuracy_level, max_positions=context,
                                    head_accuracy_level=accuracy_level, kernels=kernels)  # fmt: skip
            onnx.save(prefill, str(staging / "prefill.onnx"), save_as_external_data=True, location="prefill.onnx.data")
        os.replace(staging, folder / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tokenizer.save(str(folder / "tokenizer.json"))
    if template:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    tmp = folder / ".model.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    os.replace(tmp, folder / "model.yaml")
    return folder


def _forwardpass_kernels_unfit(hp, prefill_accuracy_level: int | None) -> str | None:
    """Why forwardpass's kernels cannot serve this model as asked, or None: their attention's limits (ort_ops.c),
    and a second prompt graph (--prefill-accuracy-level picks ONNX Runtime's fp32 activations; the kernels
    compute prompts and decode steps the same way, so it would be a second copy of the weights for nothing)."""
    group = hp.n_head // hp.n_head_kv if hp.n_head_kv and hp.n_head % hp.n_head_kv == 0 else 0
    if not group or hp.head_dim % 2 or hp.head_dim > 256 or group * hp.head_dim > 4096:
        return (f"attention of {hp.n_head} heads over {hp.n_head_kv} key/value heads of {hp.head_dim}: the kernel "
                f"takes an even head size up to 256 and up to 4096 query values a key/value head")  # fmt: skip
    if prefill_accuracy_level is not None:
        return "a second prompt graph (--prefill-accuracy-level) is for ONNX Runtime's operators"
    return None


def _token_id(source: GGUFFile, key: str, default: int | None = None) -> int:
    token = source.number(key, int, ... if default is None else default)
    if token != default and not 0 <= token < source.hparams.n_vocab:
        raise GGUFError(f"{source.path}: metadata '{key}' is {token}; expected a token id from 0 to "
                        f"{source.hparams.n_vocab - 1}")  # fmt: skip
    return token
