"""A loopback HTTP server for the demo corpus (and tests): started and stopped by its user."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar


class _Handler(SimpleHTTPRequestHandler):
    content_types: ClassVar[dict[str, str]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the pipeline reports what matters

    def guess_type(self, path: str | Any) -> str:
        url_path = "/" + str(Path(str(path)).relative_to(Path(self.directory))).replace("\\", "/")
        return self.content_types.get(url_path) or super().guess_type(path)


@contextmanager
def serve_directory(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `root` on loopback, on `port` when it is free (else any free port); yields the
    base URL, stops on exit. A fixed port keeps URLs, keys and so release bytes the same
    between runs.

    `root/content_types.json` (path -> content type) overrides guessed types,
    so the corpus can plant lies such as HTML served under a `.jpg` name.
    """
    root = Path(root)
    overrides_file = root / "content_types.json"
    overrides = json.loads(overrides_file.read_text()) if overrides_file.exists() else {}
    handler = type("DemoHandler", (_Handler,), {"content_types": overrides})
    serve = partial(handler, directory=str(root))
    try:
        server = ThreadingHTTPServer((host, port), serve)
    except OSError:
        if not port:
            raise
        server = ThreadingHTTPServer((host, 0), serve)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
