"""Embedding an accel bundle in a production program: numpy and the engine's runtime only (no
torch, no diffusers). Writes images, or serves them over HTTP from one shared bundle.

    python examples/serve_bundle.py BUNDLE -n 16 --out images.npz
    python examples/serve_bundle.py BUNDLE --serve 8000
    curl -s localhost:8000 -d '{"n": 4, "seed": 1}'     # -> {"shape": [...], "images": [...]}

The bundle is checked (file hashes, this machine against its target) before its engine opens; a
mismatch is one error message and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from accel.core.errors import AccelError
from accel.runtime import Bundle


def generate(bundle: Bundle, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """n images in [0, 1] from seeded noise, labels cycling through the classes."""
    noise = np.random.default_rng(seed).standard_normal((n, *bundle.plan.sample_shape))
    classes = bundle.plan.num_classes
    labels = np.arange(n) % classes if classes else None
    images = bundle.sample(noise.astype(np.float32), labels, seed=seed)
    return np.clip((images + 1) / 2, 0, 1), labels


def serve(bundle: Bundle, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            try:
                body = json.loads(
                    self.rfile.read(int(self.headers.get("Content-Length", 0))) or "{}"
                )
                images, _ = generate(bundle, int(body.get("n", 1)), int(body.get("seed", 0)))
                reply, status = {"shape": list(images.shape), "images": images.tolist()}, 200
            except (ValueError, AccelError) as e:
                reply, status = {"error": str(e)}, 400
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    # one Bundle, many request threads: the runtime is safe for concurrent callers
    print(f"serving {bundle.path} on :{port}", file=sys.stderr)
    ThreadingHTTPServer(("", port), Handler).serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("-n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="images.npz")
    p.add_argument("--serve", type=int, metavar="PORT")
    args = p.parse_args()
    try:
        bundle = Bundle(args.bundle)
    except AccelError as e:
        sys.exit(f"error: {e}")
    if args.serve:
        serve(bundle, args.serve)
        return
    images, labels = generate(bundle, args.n, args.seed)
    np.savez(
        args.out, images=images.astype(np.float32), labels=labels if labels is not None else []
    )
    print(f"wrote {args.n} images {list(images.shape[1:])} to {args.out}")


if __name__ == "__main__":
    main()
