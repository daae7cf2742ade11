"""Embedding an accel bundle in a production program: numpy and the engine's runtime only (no
torch, no diffusers). Writes images, or serves them over HTTP from one shared bundle.

    python examples/serve_bundle.py BUNDLE -n 16 --out images.npz
    python examples/serve_bundle.py BUNDLE --serve 8000          # loopback only (--host to widen)
    curl -s localhost:8000 -d '{"n": 4, "seed": 1}'     # -> {"shape": [...], "images": [...]}
    curl -s localhost:8000/health                       # -> {"status": "ok", "inflight": 0}

The bundle is checked (file hashes, this machine against its target) before its engine opens; a
mismatch is one error message and exit code 1.

The server checks every request before anything is computed, and answers with a JSON body and a
status: 400 for malformed JSON, unknown keys or values out of range (n outside the bundle's batch
profile, the ``batch`` of its target; a seed outside 0..2^63-1), 411 without a Content-Length, 413
for a body over 4 KiB, 404 for other paths. At most ``--max-inflight`` requests compute at once;
one that cannot start within ``--queue-timeout`` seconds is shed with 503 and ``Retry-After``, so
above capacity the server answers quickly instead of queueing without bound. A client that goes
away mid-request costs its computation and nothing else. ``GET /stats`` returns the counts by
status (the load test reads them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from accel.core.errors import AccelError, CheckpointError
from accel.runtime import Bundle

MAX_BODY = 4096  # bytes: a request is {"n": ..., "seed": ...}
MAX_SEED = 2**63 - 1


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def generate(bundle: Bundle, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """n images in [0, 1] from seeded noise, labels cycling through the classes."""
    noise = np.random.default_rng(seed).standard_normal((n, *bundle.plan.sample_shape))
    classes = bundle.plan.num_classes
    labels = np.arange(n) % classes if classes else None
    images = bundle.sample(noise.astype(np.float32), labels, seed=seed)
    return np.clip((images + 1) / 2, 0, 1), labels


def batch_limit(bundle: Bundle) -> int:
    """The largest n a request may ask for: the bundle's target batch profile's max."""
    batch = (bundle.info.get("target") or {}).get("batch") or {}
    return int(batch.get("max") or (bundle.info.get("batch_range") or [1, 64])[1])


def parse_request(body: bytes, max_n: int) -> tuple[int, int]:
    """(n, seed) of a request body, or RequestError(400) saying what is wrong."""
    try:
        request = json.loads(body.decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, 'the body must be a JSON object such as {"n": 4, "seed": 1}')
    unknown = sorted(set(request) - {"n", "seed"})
    if unknown:
        raise RequestError(400, f"unknown keys {unknown}; a request takes n and seed")
    n, seed = request.get("n", 1), request.get("seed", 0)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise RequestError(
            400, f"n must be an integer in 1..{max_n} (this bundle's batch profile), got {n!r}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise RequestError(400, f"seed must be an integer in 0..2^63-1, got {seed!r}")
    return n, seed


def make_server(
    bundle: Bundle,
    port: int,
    host: str = "127.0.0.1",
    max_inflight: int | None = None,
    queue_timeout: float = 1.0,
) -> ThreadingHTTPServer:
    max_n = batch_limit(bundle)
    slots = threading.BoundedSemaphore(max_inflight or os.cpu_count() or 1)
    stats: Counter[str] = Counter()
    lock = threading.Lock()
    inflight = [0]

    def count(key: str, delta: int = 1) -> None:
        with lock:
            stats[key] += delta

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # noqa: A002 (http.server's name)
            pass  # the counts are in /stats; a line per request would be the bottleneck

        def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
            count(str(status))
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if status >= 400:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                count("client gone")
                self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self.reply(200, {"status": "ok", "inflight": inflight[0]})
            elif self.path == "/stats":
                with lock:
                    counts = dict(stats)
                self.reply(200, counts)
            else:
                self.reply(404, {"error": f"no {self.path}; POST / or GET /health, /stats"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                if self.path not in ("/", "/generate"):
                    raise RequestError(404, f"no {self.path}; POST / with a JSON body")
                length = self.headers.get("Content-Length")
                if length is None:
                    raise RequestError(411, "a request needs a Content-Length")
                if not length.isdigit():
                    raise RequestError(400, f"Content-Length {length!r} is not a byte count")
                if int(length) > MAX_BODY:
                    raise RequestError(413, f"the body is {length} bytes; at most {MAX_BODY}")
                n, seed = parse_request(self.rfile.read(int(length)), max_n)
                if not slots.acquire(timeout=queue_timeout):
                    raise RequestError(503, "over capacity: retry later")
                try:
                    with lock:
                        inflight[0] += 1
                    images, _ = generate(bundle, n, seed)
                finally:
                    with lock:
                        inflight[0] -= 1
                        idle = inflight[0] == 0
                    slots.release()
                    if idle:  # the last request of a burst: hand its freed pages back
                        trim_malloc()
                self.reply(200, {"shape": list(images.shape), "images": images.tolist()})
            except RequestError as e:
                retry = {"Retry-After": "1"} if e.status == 503 else None
                self.reply(e.status, {"error": str(e)}, retry)
            except CheckpointError as e:  # the bundle drew NaN: the server's fault
                self.reply(500, {"error": str(e)})
            except AccelError as e:  # the engine refused the input: the request's fault
                self.reply(400, {"error": str(e)})
            except (BrokenPipeError, ConnectionResetError):
                count("client gone")
                self.close_connection = True

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    return Server((host, port), Handler)


@functools.cache
def _libc():
    """glibc, or None where there is none (its malloc tuning is then skipped)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each request thread a malloc arena of its own and keeps the arenas' freed
    pages: after a load at 40 requests/s the server stayed 2.9 MB (3%) above its baseline with
    the default (up to 8 per core), 0.9 MB with 2 (benchmarks/load_test.py). A no-op elsewhere."""
    if _libc():
        _libc().mallopt(-8, arenas)  # M_ARENA_MAX


def trim_malloc() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``), as the server does
    when its last request in flight ends: without it, memory after a burst of concurrent requests
    stays at the burst's high-water mark (freed, not leaked: +1.3% after 80 requests/s). A no-op
    elsewhere."""
    if _libc():
        _libc().malloc_trim(0)


def serve(bundle: Bundle, port: int, host: str = "127.0.0.1", **options) -> None:
    # one Bundle, many request threads: the runtime is safe for concurrent callers
    limit_malloc_arenas()
    server = make_server(bundle, port, host, **options)
    where = server.server_address
    print(f"serving {bundle.path} on {where[0]}:{where[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("-n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="images.npz")
    p.add_argument("--serve", type=int, metavar="PORT", help="serve on PORT (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    p.add_argument("--max-inflight", type=int, default=None, help="default: the CPU count")
    p.add_argument("--queue-timeout", type=float, default=1.0)
    args = p.parse_args()
    try:
        bundle = Bundle(args.bundle)
    except AccelError as e:
        sys.exit(f"error: {e}")
    if args.serve is not None:
        serve(bundle, args.serve, args.host, max_inflight=args.max_inflight,
              queue_timeout=args.queue_timeout)  # fmt: skip
        return
    images, labels = generate(bundle, args.n, args.seed)
    np.savez(
        args.out, images=images.astype(np.float32), labels=labels if labels is not None else []
    )
    print(f"wrote {args.n} images {list(images.shape[1:])} to {args.out}")


if __name__ == "__main__":
    main()
