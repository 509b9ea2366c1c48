"""OpenAI's Responses API (server/responses.py) with the official `openai` client against the demo's SmolLM2
(``llm_app``): text whole and streamed (the event sequence, deltas that join to the whole answer), instructions,
structured output with ``responses.parse``, a function call and its ``function_call_output`` round trip,
``previous_response_id`` over the in-memory store, ``store: false``, ``max_output_tokens`` giving
``status: incomplete``, and refusals naming this API's own fields."""

from __future__ import annotations

import json

import pytest

from forwardpass.server.response_store import ResponseStore, StoredResponse
from forwardpass.server.responses import translate

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}, "strict": True}  # fmt: skip
ASK = "What is the weather in Paris right now?"
SHORT = "Answer with one word: what color is the sky on a clear day?"


@pytest.fixture(scope="module")
def client(llm_app):
    return openai.OpenAI(base_url=f"{llm_app.url}/v1", api_key="unused", max_retries=0, timeout=120)


def events_of(stream) -> list:
    return [event for event in stream]


def test_text_streamed_is_the_event_sequence_and_joins_to_the_whole_answer(client):
    body = {"model": "smollm2", "input": SHORT, "temperature": 0, "max_output_tokens": 16}
    whole = client.responses.create(**body)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.status == "completed"
    assert whole.output_text and [item.type for item in whole.output] == ["message"]
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    assert 0 < whole.usage.output_tokens < 16
    events = events_of(client.responses.create(**body, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                                "response.output_text.done", "response.content_part.done",
                                "response.output_item.done", "response.completed"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.id == events[-1].response.id
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0 for e in deltas)
    text = "".join(e.delta for e in deltas)
    assert text == next(e.text for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert final.output_text == text == whole.output_text
    assert final.status == whole.status and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens and final.output[0].id == item_id
    assert client.responses.retrieve(final.id).output_text == text  # a streamed response is stored too


def test_the_stream_helper_gives_the_final_response(client):
    with client.responses.stream(model="smollm2", input=SHORT, temperature=0, max_output_tokens=16) as stream:
        final = stream.get_final_response()
    again = client.responses.create(model="smollm2", input=SHORT, temperature=0, max_output_tokens=16)
    assert final.output_text == again.output_text and final.status == "completed"


def test_instructions_are_the_system_message_and_input_items_the_chat_messages(client):
    instructions = "You are a pirate. Always answer like a pirate."
    first = client.responses.create(model="smollm2", instructions=instructions, input="Who are you?",
                                    temperature=0, max_output_tokens=12)  # fmt: skip
    plain = client.responses.create(model="smollm2", input="Who are you?", temperature=0, max_output_tokens=12)
    assert first.instructions == instructions and first.output_text != plain.output_text
    items = client.responses.create(model="smollm2", temperature=0, max_output_tokens=12, input=[
        {"role": "developer", "content": instructions},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Who are "},
                                                        {"type": "input_text", "text": "you?"}]}])  # fmt: skip
    assert items.output_text == first.output_text and items.usage.input_tokens == first.usage.input_tokens


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    founded: int = pydantic.Field(ge=0, le=2100)
    rivers: list[str] = pydantic.Field(max_length=2)


def test_parse_with_a_pydantic_model_and_json_object_always_parse(client):
    for question in ("Describe Paris as JSON.", "Describe a city you like as JSON."):
        parsed = client.responses.parse(model="smollm2", input=question, text_format=City, temperature=0,
                                        max_output_tokens=120)  # fmt: skip
        assert parsed.status == "completed", parsed
        assert isinstance(parsed.output_parsed, City)
        assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "City"
    loose = client.responses.create(model="smollm2", input='Give a JSON object with the keys "city" and "country" '
                                    "for Rome.", temperature=0, max_output_tokens=60,
                                    text={"format": {"type": "json_object"}})  # fmt: skip
    assert loose.status == "completed" and isinstance(json.loads(loose.output_text), dict)
    text = client.responses.create(model="smollm2", input=SHORT, temperature=0, max_output_tokens=16,
                                   text={"format": {"type": "text"}})  # fmt: skip
    assert text.output_text == client.responses.create(model="smollm2", input=SHORT, temperature=0,
                                                       max_output_tokens=16).output_text  # fmt: skip


def test_a_function_call_and_its_output_round_trip(client):
    first = client.responses.create(model="smollm2", input=ASK, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_output_tokens=120)  # fmt: skip
    assert first.status == "completed" and [item.type for item in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"celsius": 18})}
    second = client.responses.create(model="smollm2", previous_response_id=first.id, input=[result], tools=[WEATHER],
                                     tool_choice="none", temperature=0, max_output_tokens=24)  # fmt: skip
    assert second.output_text and second.previous_response_id == first.id
    # the same conversation sent whole (no store) is the same prompt: the same answer, the same input tokens
    history = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True), result]
    whole = client.responses.create(model="smollm2", input=history, tools=[WEATHER], tool_choice="none",
                                    temperature=0, max_output_tokens=24, store=False)  # fmt: skip
    assert whole.output_text == second.output_text and whole.usage.input_tokens == second.usage.input_tokens


def test_a_streamed_function_call_is_its_argument_events_and_the_same_call(client):
    body = {"model": "smollm2", "input": ASK, "tools": [WEATHER], "tool_choice": "required", "temperature": 0,
            "max_output_tokens": 120}  # fmt: skip
    whole = client.responses.create(**body)
    events = events_of(client.responses.create(**body, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]  # fmt: skip
    added, done = events[2].item, events[5].item
    assert added.type == done.type == "function_call" and added.call_id == done.call_id and added.id == done.id
    assert events[3].delta == events[4].arguments == done.arguments
    assert (done.name, json.loads(done.arguments)) == (whole.output[0].name, json.loads(whole.output[0].arguments))
    assert events[-1].response.output[0].call_id == done.call_id


def test_previous_response_id_continues_a_stored_conversation_and_get_returns_it(client):
    first = client.responses.create(model="smollm2", input="My name is Ada. Say hi.", temperature=0,
                                    max_output_tokens=12)  # fmt: skip
    stored = client.responses.retrieve(first.id)
    assert stored.model_dump() == first.model_dump()
    second = client.responses.create(model="smollm2", previous_response_id=first.id, input="What is my name?",
                                     temperature=0, max_output_tokens=12)  # fmt: skip
    history = [{"role": "user", "content": "My name is Ada. Say hi."},
               {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}]  # fmt: skip
    whole = client.responses.create(model="smollm2", input=history, temperature=0, max_output_tokens=12)
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.total_tokens
    assert second.output_text == whole.output_text


def test_store_false_is_not_kept(client, llm_app):
    unstored = client.responses.create(model="smollm2", input=SHORT, temperature=0, max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    response = llm_app.post("/v1/responses", json={"model": "smollm2", "input": "Go on.",
                                                   "previous_response_id": unstored.id})  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["param"] == "previous_response_id"


def test_max_output_tokens_gives_status_incomplete(client):
    cut = client.responses.create(model="smollm2", input="Write a long story about a dragon.", temperature=0,
                                  max_output_tokens=5)  # fmt: skip
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 5 and cut.output[0].status == "incomplete" and cut.output_text
    events = events_of(client.responses.create(model="smollm2", input="Write a long story about a dragon.",
                                               temperature=0, max_output_tokens=5, stream=True))  # fmt: skip
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == cut.output_text


def test_null_fields_are_absent(llm_app):
    body = {"model": "smollm2", "input": SHORT, "max_output_tokens": 4, "temperature": None, "tools": None,
            "tool_choice": None, "text": None, "reasoning": None, "instructions": None, "metadata": {"app": "test"},
            "user": "u1", "include": [], "truncation": "disabled", "parallel_tool_calls": None}  # fmt: skip
    response = llm_app.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"app": "test"} and response.json()["user"] == "u1"


@pytest.mark.parametrize(("body", "param"), [
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "input[0].arguments"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": 5}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name"),
    ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"instructions": ["not a string"]}, "instructions"),
])  # fmt: skip
def test_bad_fields_are_a_400_naming_the_responses_field(llm_app, body, param):
    response = llm_app.post("/v1/responses", json={"model": "smollm2", "input": "Hi", "max_output_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", response.text


def test_unknown_model_and_unknown_response_id_are_404s(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hi")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_never")


def stored(response_id: str, text: str = "") -> StoredResponse:
    return StoredResponse({"id": response_id}, [{"role": "user", "content": text}])


def test_the_store_is_bounded_by_count_and_bytes_least_recently_used_first():
    store = ResponseStore(max_responses=2, max_bytes=10_000)
    for name in ("a", "b"):
        assert store.put(stored(name))
    assert store.get("a") is not None  # a is now the most recently used: b goes first
    store.put(stored("c"))
    assert [store.get(k) is not None for k in "abc"] == [True, False, True] and len(store) == 2
    assert not store.put(stored("huge", "x" * 10_000)) and store.get("huge") is None  # alone over the bound
    store.put(stored("d", "y" * 6_000))
    store.put(stored("e", "z" * 6_000))  # together over max_bytes: d goes
    assert store.get("d") is None and store.get("e") is not None and store.bytes <= 10_000


def test_a_continuation_carries_the_conversation_but_not_the_previous_instructions():
    store = ResponseStore()
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    store.put(StoredResponse({"id": "resp_1"}, [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "", "tool_calls": [call]}]))  # fmt: skip
    turn = translate({"model": "m", "previous_response_id": "resp_1", "instructions": "Be brief.",
                      "input": [{"type": "function_call_output", "call_id": "call_1", "output": "42"},
                                {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
                                {"type": "function_call", "call_id": "call_3", "name": "h", "arguments": "{}"}]},
                     store)  # fmt: skip
    roles = [m["role"] for m in turn.chat["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert turn.chat["messages"][0]["content"] == "Be brief." and turn.conversation[0]["role"] == "user"
    assert [c["id"] for c in turn.chat["messages"][-1]["tool_calls"]] == ["call_2", "call_3"]  # parallel: one turn
    assert turn.origins == [("instructions",), ("previous_response_id",), ("previous_response_id",), ("input", 0),
                            ("input", 1)]  # fmt: skip


def test_a_response_whole_or_streamed_writes_its_request_log_line(client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="forwardpass.requests"):
        whole = client.responses.create(model="smollm2", input="Hi.", max_output_tokens=3, temperature=0)
        streamed = [e for e in client.responses.create(model="smollm2", input="Hi.", max_output_tokens=3, stream=True)]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "forwardpass.requests"]
    assert [line["id"] for line in lines] == [whole.id, streamed[-1].response.id]  # the response's own id
    assert all(line["model"] == "smollm2" and 0 < line["completion_tokens"] <= 3 and line["choices"] == 1
               for line in lines)  # fmt: skip
