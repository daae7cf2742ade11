"""A served bundle under load (issue #18): examples/serve_bundle.py on loopback, open-loop clients
at increasing rates with malformed, oversized and disconnecting requests mixed in; throughput,
p50/p99 latency, errors by kind, the server's memory, and whether every well-formed request got
the images the bundle draws for it alone.

    python benchmarks/load_test.py [--rates 2 5 10 20 40 80] [--seconds 6] [--max-inflight 2]
        [--store .accel-store] [--out benchmarks/results/load_test.json]

The bundle is the shipped digits teacher at 4 guided DDIM steps through onnxruntime (built by the
same stages a recipe runs, cached in the store). Arrivals are Poisson at each rate (seeded); of
every 20 requests, 17 are well-formed (n in 1, 2, 4; seeds from a fixed list whose images are
computed first, in this process, one request at a time), 2 malformed (each of: bad JSON, n = 0,
n = 10^7, an unknown key, a float n) and 1 oversized (64 KiB); at each rate one client sends half
a body and hangs up, and one sends a whole request and hangs up before the reply. The server's
resident memory is read from /proc after a warm-up that sends every request size and kind, as
many at once as may run (so that onnxruntime's arenas and the error paths have their working
size), at each level's peak,
1 s after each level, and 3 s after the last.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

MALFORMED = [b"{not json", b'{"n": 0}', b'{"n": 10000000}', b'{"n": 2, "steps": 9}', b'{"n": 1.5}']


def build_bundle(store_root: Path | None) -> Path:
    from accel.core.target import load_target
    from accel.demo.digits import TEACHER_DIR
    from accel.pipeline import default_store, run_or_reuse
    from accel.registry import get_stage

    store = default_store(store_root)
    target = load_target("cpu")
    artifact = store.source(TEACHER_DIR)
    for name, config in (
        ("onnx", {"num_inference_steps": 4, "guidance_scale": 1.5}),
        ("ort", {"gate": {"metric": "off"}}),
        ("bundle", {"name": "digits-teacher-4"}),
    ):
        stage = get_stage(name)
        artifact = run_or_reuse(stage, stage.config(**config), artifact, target, store)
    return artifact.path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def post(port: int, body: bytes, timeout: float = 60) -> tuple[int, bytes, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/", body=body)
        r = conn.getresponse()
        return r.status, r.read(), time.perf_counter() - t0
    except (ConnectionError, OSError) as e:
        return -1, str(e).encode(), time.perf_counter() - t0
    finally:
        conn.close()


def hang_up(port: int, whole: bool) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    body = b'{"n": 4, "seed": 1}'
    part = body if whole else body[:7]
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + part)
    s.close()


def run_level(port, rate, seconds, expected, rng, pid) -> dict:
    good = list(expected)
    arrivals, t = [], 0.0
    while t < seconds:
        t += rng.exponential(1 / rate)
        arrivals.append(t)
    results: list[tuple[str, int, float, bool | None]] = []
    lock = threading.Lock()
    peak = [rss_kib(pid)]

    def one(i: int) -> None:
        kind = "good" if i % 20 < 17 else "malformed" if i % 20 < 19 else "oversized"
        if kind == "good":
            n, seed = good[i % len(good)]
            body = json.dumps({"n": n, "seed": seed}).encode()
        elif kind == "malformed":
            body = MALFORMED[i % len(MALFORMED)]
        else:
            body = b'{"n": 1}' + b" " * 65536
        status, data, latency = post(port, body)
        correct = None
        if kind == "good" and status == 200:
            images = np.asarray(json.loads(data)["images"], np.float32)
            correct = bool(np.allclose(images, expected[(n, seed)], atol=1e-5))
        with lock:
            results.append((kind, status, latency, correct))
            peak[0] = max(peak[0], rss_kib(pid))

    start = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        futures = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, i))
            if i == len(arrivals) // 3:
                pool.submit(hang_up, port, False)
            if i == 2 * len(arrivals) // 3:
                pool.submit(hang_up, port, True)
        for f in futures:
            f.result()
    wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == "good" and r[1] == 200]
    lat = np.array([r[2] for r in ok]) * 1e3
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, _, _ in results:
        by_kind.setdefault(kind, {}).setdefault(str(status), 0)
        by_kind[kind][str(status)] += 1
    return {
        "rate_per_s": rate,
        "sent": len(results),
        "served_per_s": len(ok) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "statuses_by_kind": by_kind,
        "wrong_images": sum(1 for r in ok if r[3] is False),
        "well_formed_failed": sum(1 for r in results if r[0] == "good" and r[1] not in (200, 503)),
        "peak_rss_mib": peak[0] / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[2, 5, 10, 20, 40, 80])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/load_test.json"))
    args = p.parse_args()
    import serve_bundle

    from accel.runtime import Bundle

    path = build_bundle(args.store)
    bundle = Bundle(path)
    expected = {(n, s): serve_bundle.generate(bundle, n, s)[0] for n in (1, 2, 4) for s in range(6)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "serve_bundle.py"), str(path), "--serve", "0",
         "--max-inflight", str(args.max_inflight), "--queue-timeout", "0.5"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        port = int(line.rsplit(":", 1)[1])
        # warm-up: every request size and kind, as many at once as may run (onnxruntime sizes
        # its arenas, the error paths load what they use): the baseline is the working set
        with ThreadPoolExecutor(args.max_inflight) as pool:  # as many at once as may run
            list(pool.map(lambda r: post(port, json.dumps({"n": r[0], "seed": r[1]}).encode()),
                          list(expected) * 2))  # fmt: skip
        for body in [*MALFORMED, b'{"n": 1}' + b" " * 65536]:
            post(port, body)
        hang_up(port, False)
        hang_up(port, True)
        time.sleep(1)
        baseline = rss_kib(proc.pid)
        rng = np.random.default_rng(0)
        levels = []
        for rate in args.rates:
            level = run_level(port, rate, args.seconds, expected, rng, proc.pid)
            time.sleep(1)
            level["rss_after_1s_idle_mib"] = rss_kib(proc.pid) / 1024
            levels.append(level)
            print(json.dumps(level), flush=True)
        time.sleep(3)
        after = rss_kib(proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        proc.kill()
        proc.wait()
    report = {
        "command": "python benchmarks/load_test.py " + " ".join(sys.argv[1:]),
        "bundle": str(path),
        "max_inflight": args.max_inflight,
        "levels": levels,
        "rss_mib": {"before": baseline / 1024, "after_idle_3s": after / 1024},
        "server_stats": stats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["rss_mib"]), json.dumps(stats))


if __name__ == "__main__":
    main()
