"""HTTP edge cases of forwardpass's own protocol, over raw sockets, httpx and curl (issue 13).

The server runs with small connection limits so that slow clients are quick to play:
keep-alive 1 s, a request gets 1 s plus 1 s per 1,000 bytes to arrive, bodies up to 1 MB.
It is the app on a loopback socket in this process (fixtures.inprocess.SocketServer): the protocol
``forwardpass serve`` runs, without a process to start.
"""

from __future__ import annotations

import asyncio
import http.client
import shutil
import socket
import subprocess
import time

import httpx
import orjson
import pytest
from fixtures import copy_models
from fixtures.inprocess import SocketServer

from forwardpass.server.config import ServeConfig

MAX_BODY = 1_000_000
MIN_RATE = 1000  # bytes/s
BODY = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]})


@pytest.fixture(scope="module")
def edge(demo_repo, tmp_path_factory):
    root = copy_models(demo_repo, tmp_path_factory.mktemp("edges") / "models", "iris")
    config = ServeConfig(repository=root, poll_interval=0, max_body_bytes=MAX_BODY, keep_alive_timeout=1,
                         body_timeout=1, body_min_rate=MIN_RATE, linger_timeout=5)  # fmt: skip
    with SocketServer(config) as server:
        yield server


def head(length: int, extra: bytes = b"", path: bytes = b"/v2/models/iris/infer") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path, length, extra))  # fmt: skip


def padded(size: int) -> bytes:
    """A valid iris request of ``size`` bytes (JSON allows the whitespace)."""
    return BODY[:-1] + b" " * (size - len(BODY)) + b"}"


def connect(server: SocketServer, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection within ``timeout`` seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each complete response in ``data``."""
    out = []
    while b"\r\n\r\n" in data:
        top, rest = data.split(b"\r\n\r\n", 1)
        lines = top.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One complete response (keep-alive: the connection stays open)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = responses(data)
        if found and len(found[0][2]) == int(found[0][1].get("content-length", 0)):
            return found[0]
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; it sent {data!r}"
        data += chunk
    raise AssertionError(f"no complete response in {timeout} s; got {data!r}")


def send_slowly(sock: socket.socket, data: bytes, seconds: float, pieces: int = 10) -> None:
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        sock.sendall(data[i : i + step])
        time.sleep(seconds / pieces)  # the client's pace, not a wait for the server


# -- slow uploads --------------------------------------------------------------------------------------------


def test_slow_upload_above_the_minimum_rate_is_answered(edge):
    body = padded(6000)  # 6 KB at 2 KB/s: 3 s, past the keep-alive and body timeouts (1 s) but above the rate
    with connect(edge) as sock:
        sock.sendall(head(len(body)))
        send_slowly(sock, body, 3.0)
        status, _, answer = read_response(sock)
    assert status == 200 and orjson.loads(answer)["model_name"] == "iris"


def test_upload_below_the_minimum_rate_is_cut_with_408(edge):
    body = padded(3000)
    with connect(edge) as sock:
        sock.sendall(head(len(body)))
        start, data = time.monotonic(), b""
        for i in range(0, len(body), 50):  # 250 B/s, a quarter of the minimum rate
            sock.sendall(body[i : i + 50])
            sock.settimeout(0.2)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            break
        elapsed = time.monotonic() - start
        rest, closed = read_until_closed(sock)
    status, headers, answer = responses(data + rest)[0]
    assert status == 408 and headers["connection"] == "close" and closed
    assert "FORWARDPASS_BODY_MIN_RATE" in orjson.loads(answer)["error"]
    assert 1.0 <= elapsed <= 4.0  # 1 s plus what 250 B/s earns at 1,000 B/s, swept every 0.25 s


def test_next_request_after_keep_alive_idle_may_send_its_body_late(edge):
    with connect(edge) as sock:
        sock.sendall(head(len(BODY)) + BODY)
        assert read_response(sock)[0] == 200
        time.sleep(0.6)  # idle, under the keep-alive timeout (1 s)
        sock.sendall(head(len(BODY)))
        time.sleep(0.8)  # the body follows later: idle since the last answer for 1.4 s, but a request is arriving
        sock.sendall(BODY)
        assert read_response(sock)[0] == 200


# -- bodies over the limit -----------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_answered_413_at_once(edge):
    with connect(edge) as sock:
        start = time.monotonic()
        sock.sendall(head(10 * MAX_BODY))  # no body follows
        status, headers, answer = read_response(sock, timeout=3)
        assert time.monotonic() - start < 0.9  # before the keep-alive (1 s) or body timeout could cut it
    assert status == 413 and headers["connection"] == "close"
    assert f"{10 * MAX_BODY} bytes is over the limit of {MAX_BODY} bytes" in orjson.loads(answer)["error"]


@pytest.mark.parametrize("fields", [b"Expect: 100-continue\r\nContent-Length: %d\r\n",
                                    b"Content-Length: %d\r\nExpect: 100-continue\r\n"])  # fmt: skip
def test_expect_100_continue_over_the_limit_gets_413_not_continue(edge, fields):
    with connect(edge) as sock:
        sock.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n" + fields % (10 * MAX_BODY) + b"\r\n")
        data, closed = read_until_closed(sock, timeout=3)
    assert data.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in data and closed


def post_with_http_client(url: str, body: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    connection.request("POST", "/v2/models/iris/infer", body=body, headers={"content-type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def post_with_httpx(url: str, body: bytes) -> tuple[int, bytes]:
    r = httpx.post(f"{url}/v2/models/iris/infer", content=body, timeout=20)
    return r.status_code, r.content


def post_with_httpx_async(url: str, body: bytes) -> tuple[int, bytes]:
    async def post() -> tuple[int, bytes]:
        async with httpx.AsyncClient(timeout=20) as client:
            r = await client.post(f"{url}/v2/models/iris/infer", content=body)
            return r.status_code, r.content

    return asyncio.run(post())


# without the linger, http.client gets BrokenPipeError and httpx.AsyncClient a ReadError (a reset)
@pytest.mark.parametrize("post", [post_with_http_client, post_with_httpx, post_with_httpx_async])
def test_python_clients_read_the_413_of_a_body_far_over_the_limit(edge, post):
    status, answer = post(edge.url, b"x" * (40 * MAX_BODY))
    assert status == 413 and "over the limit" in orjson.loads(answer)["error"]


def test_httpx_reads_the_413_of_a_chunked_body_over_the_limit(edge):
    def chunks():
        for _ in range(400):
            yield b"x" * 100_000

    r = httpx.post(f"{edge.url}/v2/models/iris/infer", content=chunks(), timeout=20)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("expect", ["Expect: 100-continue", "Expect:"])  # "Expect:" turns curl's off
def test_curl_reads_the_413_of_a_body_far_over_the_limit(edge, tmp_path, expect):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (40 * MAX_BODY))
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", expect, "--data-binary", f"@{big}",
                          f"{edge.url}/v2/models/iris/infer"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n413") and "over the limit" in out.stdout


# -- malformed request lines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"GET /v2/health/live\r\n", b"GET /v2/health/live\r\n\r\n",
                                  b"GET /v2/health/live\r\nHost: x\r\n\r\n"])  # fmt: skip
def test_http_0_9_request_line_is_400(edge, line):
    with connect(edge) as sock:
        sock.sendall(line)
        data, closed = read_until_closed(sock, timeout=3)
    status, headers, answer = responses(data)[0]
    assert status == 400 and headers["connection"] == "close" and closed
    assert "HTTP/0.9" in orjson.loads(answer)["error"]


def test_http_0_9_request_line_after_a_keep_alive_request_is_400(edge):
    with connect(edge) as sock:
        sock.sendall(head(len(BODY)) + BODY)
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /v2/health/live\r\n")
        data, closed = read_until_closed(sock, timeout=3)
    assert responses(data)[0][0] == 400 and closed


def test_pipelined_request_then_garbage_is_answered_then_400(edge):
    with connect(edge) as sock:
        sock.sendall(head(len(BODY)) + BODY + b"\x00\x01 garbage\r\n\r\n")
        data, closed = read_until_closed(sock)
    found = responses(data)
    assert [r[0] for r in found] == [200, 400] and closed
    assert orjson.loads(found[0][2])["model_name"] == "iris" and "malformed HTTP" in orjson.loads(found[1][2])["error"]
    assert found[1][1]["connection"] == "close"


# -- error replies -------------------------------------------------------------------------------------------


def test_an_error_reply_never_fails_huge_inference_header_length(edge):
    with httpx.Client(base_url=edge.url) as client:
        r = client.post("/v2/models/iris/infer", content=BODY, headers={"inference-header-content-length": str(10**30)})
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
        assert client.post("/v2/models/iris/infer", content=BODY).status_code == 200  # the connection serves on


# -- ordering and half-close ---------------------------------------------------------------------------------


def test_100_continue_for_a_pipelined_request_comes_after_the_answer_before_it(edge):
    with connect(edge) as sock:
        sock.sendall(head(len(BODY)) + BODY + head(len(BODY), b"Expect: 100-continue\r\n"))
        data = b""
        while b"100 Continue" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.index(b"HTTP/1.1 200 ") < data.index(b"HTTP/1.1 100 Continue")
        sock.sendall(BODY)
        assert read_response(sock)[0] == 200


def test_a_client_that_half_closes_after_its_request_gets_the_answer(edge):
    with connect(edge) as sock:
        sock.sendall(head(len(BODY)) + BODY)
        sock.shutdown(socket.SHUT_WR)  # as `nc -N` does: done sending, still reading
        data, closed = read_until_closed(sock)
    assert [r[0] for r in responses(data)] == [200] and closed
