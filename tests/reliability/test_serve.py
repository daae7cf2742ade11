"""The served bundle (examples/serve_bundle.py): every malformed, oversized or out-of-profile
request gets a clear status and no computation; well-formed requests, alone or concurrent, get the
images the bundle draws for them alone; above capacity the server sheds with 503; it binds to
loopback unless told otherwise."""

import http.client
import json
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from accel.pipeline import default_store
from accel.runtime import Bundle

from record import record
from tiny import build, write_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import serve_bundle  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store = default_store(root / "store")
    source = store.source(write_tiny_pipeline(root / "teacher"))
    graph = build(store, source, "onnx", num_inference_steps=2, guidance_scale=1.5)
    engine = build(store, graph, "ort", gate={"metric": "off"})
    return Bundle(build(store, engine, "bundle", name="digits").path)


def start(bundle, **options):
    server = serve_bundle.make_server(bundle, 0, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def post(port, body: bytes, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/", body=body, headers=headers or {})
    r = conn.getresponse()
    out = (r.status, json.loads(r.read() or b"{}"), dict(r.getheaders()))
    conn.close()
    return out


def expected(bundle, n, seed):
    return serve_bundle.generate(bundle, n, seed)[0]


def test_bad_requests_get_clear_statuses(bundle):
    server = start(bundle)
    port = server.server_address[1]
    limit = serve_bundle.batch_limit(bundle)
    assert limit == 64  # the cpu target's batch profile
    cases = {
        b"{not json": (400, "not JSON"),
        b"[1, 2]": (400, "JSON object"),
        b'{"n": 2, "steps": 50}': (400, "unknown keys ['steps']"),
        b'{"n": 0}': (400, "n must be an integer in 1..64"),
        b'{"n": 10000000}': (400, "n must be an integer in 1..64"),
        b'{"n": true}': (400, "n must be an integer"),
        b'{"n": 2.5}': (400, "n must be an integer"),
        b'{"seed": -1}': (400, "seed must be an integer"),
        b"\xff\xfe": (400, "not JSON"),
        b'{"n": 1}' + b" " * 5000: (413, "at most 4096"),
    }
    for body, (status, message) in cases.items():
        got, reply, _ = post(port, body)
        assert got == status and message in reply["error"], (body[:30], got, reply)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/")
    conn.endheaders()  # no Content-Length
    r = conn.getresponse()
    assert r.status == 411
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"
    conn.request("GET", "/stats")
    counts = json.loads(conn.getresponse().read())
    assert counts["400"] == 9 and counts["413"] == 1 and counts["411"] == 1
    conn.close()
    assert post(port, b'{"n": 1}')[0] == 200  # /stats left nothing locked
    server.shutdown()
    record("serve: malformed requests", kinds=len(cases) + 1, statuses=counts)


def test_concurrent_requests_get_the_images_drawn_alone_and_overload_is_shed(bundle, monkeypatch):
    requests = [(1 + i % 3, i) for i in range(12)]
    alone = {r: expected(bundle, *r) for r in requests}
    server = start(bundle, max_inflight=2, queue_timeout=30)
    port = server.server_address[1]

    def call(r):
        return post(port, json.dumps({"n": r[0], "seed": r[1]}).encode())

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(call, requests))
    for r, (status, reply, _) in zip(requests, replies, strict=True):
        assert status == 200
        np.testing.assert_allclose(np.asarray(reply["images"]), alone[r], atol=1e-6)
    server.shutdown()
    # one slot, no queue: while a request computes, every other is shed with 503 + Retry-After.
    # The first request holds the slot until the others are answered (on a fast machine, 8
    # simultaneous requests could each finish before the next arrives: no overload to see)
    entered, release, draw = threading.Event(), threading.Event(), serve_bundle.generate

    def held_generate(b, n, seed):
        if not entered.is_set():
            entered.set()
            assert release.wait(60)
        return draw(b, n, seed)

    monkeypatch.setattr(serve_bundle, "generate", held_generate)
    server = start(bundle, max_inflight=1, queue_timeout=0.0)
    port = server.server_address[1]
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, port, b'{"n": 64, "seed": 0}')
        assert entered.wait(60)
        shed = list(pool.map(lambda s: post(port, b'{"n": 64, "seed": %d}' % s), range(1, 8)))
        release.set()
        replies = [first.result(), *shed]
    statuses = [s for s, _, _ in replies]
    assert statuses == [200] + [503] * 7, statuses
    assert all(h.get("Retry-After") == "1" for _, _, h in replies[1:])
    np.testing.assert_allclose(np.asarray(replies[0][1]["images"]), expected(bundle, 64, 0),
                               atol=1e-6)  # fmt: skip
    server.shutdown()
    record("serve: concurrent and over capacity", concurrent=len(requests), clients=8,
           burst=len(statuses), served=statuses.count(200), shed=statuses.count(503))  # fmt: skip


def test_a_client_that_disconnects_mid_request_does_not_hurt_the_next(bundle):
    server = start(bundle, max_inflight=1)
    port = server.server_address[1]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{"n": 64, "se')
    s.close()  # half a body, then gone
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{"n": 64}')
    s.close()  # a whole request, gone before the reply
    status, reply, _ = post(port, b'{"n": 3, "seed": 5}')
    assert status == 200
    np.testing.assert_allclose(np.asarray(reply["images"]), expected(bundle, 3, 5), atol=1e-6)
    server.shutdown()
    record("serve: clients gone", cases=2, next_request_correct=1)


def test_the_server_binds_to_loopback_by_default(bundle):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "serve_bundle.py"), str(bundle.path),
         "--serve", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert " on 127.0.0.1:" in line, line
    finally:
        proc.kill()
        proc.wait()
