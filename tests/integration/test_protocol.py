"""HTTP/1.1 details of forwardpass's own protocol, over raw sockets (the app on a loopback socket in this process)."""

import socket
import time

import orjson
import pytest
from fixtures import copy_models
from fixtures.inprocess import SocketServer

from forwardpass.server.config import ServeConfig

KEEP_ALIVE = 1.0  # seconds (the default is 5): the idle-close test waits for it

BODY = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]})


def request(path: str = "/v2/models/iris/infer", body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), len(body), extra)) + body  # fmt: skip


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    data, out = b"", []
    while len(out) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            length = int(headers.get("content-length", 0))
            if len(rest) < length:
                break
            out.append((int(lines[0].split()[1]), headers, rest[:length]))
            data = rest[length:]
    return out


@pytest.fixture(scope="module")
def server(demo_repo, tmp_path_factory):
    root = copy_models(demo_repo, tmp_path_factory.mktemp("protocol") / "models", "iris")
    with SocketServer(ServeConfig(repository=root, poll_interval=0, keep_alive_timeout=KEEP_ALIVE)) as srv:
        yield srv


@pytest.fixture
def conn(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    yield sock
    sock.close()


def test_keep_alive_and_pipelining_answer_in_order(conn):
    conn.sendall(request() + request("/v2/health/ready", b"") .replace(b"POST", b"GET") + request())
    responses = read_responses(conn, 3)
    assert [r[0] for r in responses] == [200, 200, 200]
    assert orjson.loads(responses[0][2])["model_name"] == "iris" and orjson.loads(responses[1][2]) == {"ready": True}


def test_expect_100_continue(conn):
    conn.sendall(request(body=b"", extra=b"Expect: 100-continue\r\n").replace(b"Content-Length: 0", b"Content-Length: %d" % len(BODY)))
    assert conn.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.sendall(BODY)
    assert read_responses(conn, 1)[0][0] == 200


def test_chunked_request_body(conn):
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, BODY[:10], len(BODY) - 10, BODY[10:])
    conn.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert read_responses(conn, 1)[0][0] == 200


def test_malformed_http_is_400_and_closed(conn, server):
    conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, body = read_responses(conn, 1)[0]
    assert status == 400 and "malformed HTTP" in orjson.loads(body)["error"] and headers["connection"] == "close"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as again:  # the server is fine
        again.sendall(request())
        assert read_responses(again, 1)[0][0] == 200


def test_connection_close_and_http_1_0(conn, server):
    conn.sendall(request(extra=b"Connection: close\r\n"))
    status, headers, _ = read_responses(conn, 1)[0]
    assert status == 200 and headers["connection"] == "close"
    assert conn.recv(10) == b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as old:
        old.sendall(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        assert read_responses(old, 1)[0][0] == 200 and old.recv(10) == b""


def test_head_has_no_body(conn):
    conn.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
        data += conn.recv(4096)
    first, second = data.split(b"HTTP/1.1 ")[1:]
    assert b"content-length: " in first and first.endswith(b"\r\n\r\n")  # headers only
    assert second.startswith(b"405") or second.startswith(b"200")


def test_huge_headers_are_refused(conn):
    conn.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    status, _, body = read_responses(conn, 1)[0]
    assert status == 431 and b"64 KiB" in body


def test_percent_encoded_path_is_decoded(conn):
    conn.sendall(request("/v2/models/%69ris/infer"))
    assert read_responses(conn, 1)[0][0] == 200


def test_idle_keep_alive_connections_are_closed(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.sendall(request())
    assert read_responses(sock, 1)[0][0] == 200
    start = time.monotonic()
    assert sock.recv(10) == b""  # the server closes it after the keep-alive timeout (swept every timeout / 4)
    assert KEEP_ALIVE - 0.05 <= time.monotonic() - start <= KEEP_ALIVE + 2
    sock.close()
