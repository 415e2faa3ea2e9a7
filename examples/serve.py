"""A tiny image server: one pipeline, loaded once, shared by concurrent requests (standard library only).

    python examples/serve.py BUNDLE [--port 8000] [--backend onnxruntime]
    curl -s -X POST localhost:8000/generate -d '{"prompt": "a red circle", "seed": 0}' -o out.png

``POST /generate`` takes a JSON object ``{"prompt": str, "seed": int, "cfg": float (optional)}`` and
answers a PNG; a bad request gets 400 and one line of text. It listens on 127.0.0.1 only: it has no
authentication, so it is for one machine (put a real server in front of it to go further).

Each request runs in its own thread (``ThreadingHTTPServer``); they share the one ``Pipeline``, whose
generations run one at a time (see its docstring), so requests queue instead of failing.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"
MAX_BODY = 64 << 10  # a prompt and two numbers; anything larger is refused unread


def make_server(pipe, port: int = 0) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:``port`` (0: any free port, see ``server.server_address``) around ``pipe``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/generate":
                return self._fail(HTTPStatus.NOT_FOUND, "POST /generate")
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._fail(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is needed")
            if not 0 < size <= MAX_BODY:
                return self._fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body must be 1..{MAX_BODY} bytes")
            try:
                request = json.loads(self.rfile.read(size))
                prompt, seed, cfg = request["prompt"], request.get("seed", 0), request.get("cfg")
                if not isinstance(prompt, str) or not isinstance(seed, int) or isinstance(seed, bool):
                    raise TypeError("prompt must be a string and seed an integer")
                if cfg is not None and (not isinstance(cfg, (int, float)) or isinstance(cfg, bool)):
                    raise TypeError("cfg must be a number")
            except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError too
                return self._fail(HTTPStatus.BAD_REQUEST, f'expected {{"prompt": str, "seed": int}}: {exc}')
            from hartkit.errors import HartkitError

            try:
                image = pipe(prompt, seed=seed, cfg=cfg)
            except (HartkitError, ValueError) as exc:  # out-of-range seed or cfg
                return self._fail(HTTPStatus.BAD_REQUEST, str(exc))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            body = buf.getvalue()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _fail(self, status: HTTPStatus, message: str) -> None:
            body = (message.splitlines()[0] if message else status.phrase).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            print(f"{self.address_string()} {format % args}", file=sys.stderr)

    server = ThreadingHTTPServer((HOST, port), Handler)
    server.daemon_threads = True  # a stuck client does not keep the process alive
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a bundle folder (verified when loaded)")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default: 8000)")
    parser.add_argument("--backend", default="onnxruntime", help="runtime backend (default: onnxruntime)")
    args = parser.parse_args(argv)

    from hartkit.errors import HartkitError
    from hartkit.runtime.pipeline import Pipeline

    try:
        pipe = Pipeline.from_bundle(args.bundle, backend=args.backend)
        server = make_server(pipe, args.port)
    except (HartkitError, OSError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {args.bundle} on http://{HOST}:{server.server_address[1]}/generate", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
