"""Structured outputs and the fields real OpenAI clients send, with the official `openai` client against the
demo's SmolLM2 on loopback (``llm_app``, tests/integration/conftest.py).

Constrained decoding (generation/constraint.py, llguidance) makes the output follow the request's JSON
schema, regex, choice or Lark grammar: the tests parse and validate every answer, on sampled (not greedy)
decoding, where a 135M model left alone breaks JSON often.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated

import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def client(llm_app):
    return openai.OpenAI(base_url=f"{llm_app.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Color(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


# bounded strings (maxLength, enforced by the grammar): at temperature 1 a 135M model can write one string
# past any max_tokens, and the answer is then valid JSON so far but not whole
Short = Annotated[str, pydantic.Field(max_length=40)]


class Address(pydantic.BaseModel):
    city: Short
    zip_code: Annotated[str, pydantic.Field(max_length=12)]


class Person(pydantic.BaseModel):
    name: Short
    age: int = pydantic.Field(ge=0, le=120)
    height_m: float = pydantic.Field(ge=0.5, le=2.5)
    favorite: Color
    hobbies: list[Short] = pydantic.Field(max_length=3)
    address: Address


def test_parse_with_a_pydantic_model_gives_a_valid_nested_object_every_time(client):
    """OpenAI's .parse(): strict json_schema of nested objects, an enum, an array and bounded numbers."""
    for seed in range(3):  # sampled at temperature 1: constrained, every one parses and validates
        completion = client.beta.chat.completions.parse(
            model="smollm2", messages=ask("Invent a person: name, age, height, favorite color, hobbies, address."),
            response_format=Person, temperature=1.0, seed=seed, max_tokens=200)  # fmt: skip
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice
        person = choice.message.parsed
        assert isinstance(person, Person) and isinstance(person.address, Address)
        assert 0 <= person.age <= 120 and 0.5 <= person.height_m <= 2.5 and len(person.hobbies) <= 3


def test_json_schema_answers_validate_and_json_object_answers_parse(client):
    # the words bounded (see Short): an unbounded string sampled at temperature 1 can outrun max_tokens
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9},
                                                "words": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                          "minItems": 1, "maxItems": 2}},
              "required": ["answer", "words"], "additionalProperties": False}  # fmt: skip
    for seed in (1, 2):
        answer = client.chat.completions.create(
            model="smollm2", messages=ask("How many legs has a cat? Answer in JSON."), seed=seed, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "legs", "schema": schema, "strict": True}},
            max_tokens=100)  # fmt: skip
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    # any object: the model decides how long it is (a 135M model may ramble until max_tokens cuts it off, as
    # OpenAI's JSON mode can: the output is whole when the finish reason is stop)
    free = client.chat.completions.create(
        model="smollm2", messages=ask("Reply with a JSON object with two keys: name and age of a dog."),
        response_format={"type": "json_object"}, temperature=0, max_tokens=120)  # fmt: skip
    assert free.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(free.choices[0].message.content), dict)


def test_text_and_null_response_formats_change_nothing(client):
    plain = client.chat.completions.create(model="smollm2", messages=ask("Say hi."), temperature=0, max_tokens=8)
    for response_format in ({"type": "text"}, None):
        again = client.chat.completions.create(model="smollm2", messages=ask("Say hi."), temperature=0, max_tokens=8,
                                               extra_body={"response_format": response_format})  # fmt: skip
        assert again.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(("field", "value", "check"), [
    ("guided_regex", "[0-9]{3}-[0-9]{4}", lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
    ("guided_choice", ["yes", "no", "maybe"], lambda text: text in ("yes", "no", "maybe")),
    ("guided_grammar", 'start: "A" NUM "B"\nNUM: /[0-9]{1,4}/', lambda text: re.fullmatch(r"A[0-9]{1,4}B", text)),
])  # fmt: skip
def test_regex_choice_and_lark_grammars_as_extra_parameters(client, field, value, check):
    for completion in (
        client.chat.completions.create(model="smollm2", messages=ask("Answer."), temperature=1.0, seed=5,
                                       max_tokens=20, extra_body={field: value}),  # fmt: skip
        client.completions.create(model="smollm2", prompt="Answer:", temperature=1.0, seed=5, max_tokens=20,
                                  extra_body={field: value}),  # fmt: skip
    ):
        choice = completion.choices[0]
        text = choice.message.content if hasattr(choice, "message") else choice.text
        assert check(text), text


def test_a_streamed_constrained_answer_is_the_same_json(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    body = {"model": "smollm2", "messages": ask("A city, as JSON."), "temperature": 0.8, "seed": 9, "max_tokens": 60,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}  # fmt: skip
    whole = client.chat.completions.create(**body).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True) if c.choices]
    assert "".join(pieces) == whole and "city" in json.loads(whole)


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar"),
    ({"guided_regex": "[0-9]", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "[0-9]"}, "guided_regex"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias.99999999"),
    ({"metadata": {"k": 5}}, "metadata.k"),
    ({"store": "yes"}, "store"),
    ({"reasoning_effort": 3}, "reasoning_effort"),
])  # fmt: skip
def test_a_bad_constraint_or_field_is_a_400_naming_it(llm_app, body, param):
    response = llm_app.post("/v1/chat/completions", json={"model": "smollm2", "messages": ask("Hi."), "max_tokens": 4,
                                                          **body})  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_the_fields_sdk_based_apps_send_are_accepted(client):
    """metadata, store, user, service_tier, reasoning_effort, null-valued fields, the developer role."""
    completion = client.chat.completions.create(
        model="smollm2", messages=[{"role": "developer", "content": "Answer in one word."}, *ask("Sky color?")],
        max_tokens=6, temperature=0, metadata={"app": "tests"}, store=False, user="u-1", service_tier="auto",
        reasoning_effort="low", extra_body={"functions": None, "presence_penalty": None})  # fmt: skip
    assert completion.choices[0].message.content
    system = client.chat.completions.create(
        model="smollm2", messages=[{"role": "system", "content": "Answer in one word."}, *ask("Sky color?")],
        max_tokens=6, temperature=0)  # fmt: skip
    assert completion.choices[0].message.content == system.choices[0].message.content  # developer is system


def test_logit_bias_is_applied(client, llm_app):
    import forwardpass

    llm = forwardpass.load("smollm2", repository=llm_app.repository)
    token = llm.encode(" banana")[-1]
    forced = client.completions.create(model="smollm2", prompt="My favorite fruit is", max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100})  # fmt: skip
    assert forced.choices[0].text == " banana" * 3
    banned = client.completions.create(model="smollm2", prompt="I ate a ripe yellow", max_tokens=3, temperature=0,
                                       logit_bias={str(token): -100})  # fmt: skip
    assert "banana" not in banned.choices[0].text


def test_max_tokens_past_the_context_is_capped_to_what_fits(client, llm_app):
    import forwardpass

    llm = forwardpass.load("smollm2", repository=llm_app.repository)
    prompt = "hello" * (llm.gen.context_length - 100)  # about one token each
    used = len(llm.encode(prompt))
    room = llm.gen.context_length - used
    assert 0 < room < 200, room  # a short run: the prompt leaves little of the context
    completion = client.completions.create(model="smollm2", prompt=prompt, max_tokens=4096, temperature=0,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == room and completion.usage.prompt_tokens == used


def metric(server, name: str) -> float:
    found = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", server.get("/metrics").text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_n_choices_share_one_prefill_and_the_same_seed_gives_the_same_choices(client, llm_app):
    body = {"model": "smollm2", "messages": ask("Name a fruit."), "temperature": 1.0, "seed": 11, "max_tokens": 8}
    saved = metric(llm_app, "forwardpass_generation_prefix_cache_saved_tokens_total")
    three = client.chat.completions.create(**body, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    prompt = three.usage.prompt_tokens
    # the two other choices copied the first one's prompt KV but for its last token
    assert metric(llm_app, "forwardpass_generation_prefix_cache_saved_tokens_total") - saved >= 2 * (prompt - 1)
    assert 3 <= three.usage.completion_tokens <= 3 * 8  # every choice's tokens, the prompt counted once
    again = client.chat.completions.create(**body, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]
    assert len({c.message.content for c in three.choices}) > 1  # sampled: each choice its own stream
    alone = client.chat.completions.create(**body)  # choice 0 is the request's seed, each other seed + index
    assert alone.choices[0].message.content == three.choices[0].message.content
    streamed: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(**body, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2} and [streamed[i] for i in range(3)] == [c.message.content for c in three.choices]



def test_user_and_metadata_are_kept_in_the_request_log(client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="forwardpass.requests"):
        client.chat.completions.create(model="smollm2", messages=ask("Hi."), max_tokens=3, temperature=0,
                                       user="u-42", metadata={"team": "search"})  # fmt: skip
        for _ in client.chat.completions.create(model="smollm2", messages=ask("Hi."), max_tokens=3, stream=True,
                                                user="u-43"):  # fmt: skip
            pass
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "forwardpass.requests"]
    assert [(line["user"], line["metadata"]) for line in lines] == [("u-42", {"team": "search"}), ("u-43", None)]
    assert all(line["model"] == "smollm2" and line["completion_tokens"] <= 3 for line in lines)
