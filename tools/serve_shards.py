"""Serves a folder over HTTP with byte ranges, to try DATA.DATASET shards from a URL on one machine.

    python tools/serve_shards.py OUT [--port 8000] [--host 127.0.0.1]
    python main.py --cfg ... --data-path http://127.0.0.1:8000 --opts DATA.DATASET shards

Python's ``http.server`` answers every GET with the whole file (it ignores ``Range``); the shard reader fetches one
sample at a time by range, so this handler answers ``Range: bytes=A-B`` with 206 and those bytes only. For tests,
benchmarks and trying things out on one machine, not for serving a cluster (use an object store or a web server).
"""
import argparse
import contextlib
import http.server
import os
import re
import sys
import threading
from functools import partial
from typing import Iterator, Optional, Tuple

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """GET and HEAD of the files below the served folder, with single byte ranges; no directory listings."""

    protocol_version = "HTTP/1.1"  # keep-alive: the reader sends many small requests

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's signature)
        pass  # one line per sample would drown everything else

    def byte_range(self, size: int) -> Optional[Tuple[int, int]]:
        """The requested ``[start, end)`` within a file of ``size`` bytes, None for the whole file; raises
        ValueError for a range it cannot serve."""
        header = self.headers.get("Range")
        if not header:
            return None
        match = _RANGE.match(header.strip())
        if not match or match.groups() == ("", ""):
            raise ValueError(header)
        first, last = match.groups()
        if first == "":  # the last N bytes
            return max(size - int(last), 0), size
        start, end = int(first), min(int(last) + 1 if last else size, size)
        if start >= size or end <= start:
            raise ValueError(header)
        return start, end

    def _answer(self, body: bool) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "not found")
            return
        size = os.path.getsize(path)
        try:
            requested = self.byte_range(size)
        except ValueError:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = requested or (0, size)
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if body:
            self.send_body(path, start, end)

    def send_body(self, path: str, start: int, end: int) -> None:
        with open(path, "rb") as file:
            file.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = file.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class RangeServer(http.server.ThreadingHTTPServer):
    """One thread per connection, and room for many connections waiting to be accepted: a loader worker opens one
    per sample of its batch at once, and the default queue of 5 made the others wait for TCP's retransmissions."""

    request_queue_size = 256
    daemon_threads = True


@contextlib.contextmanager
def serve_folder(root: str, handler: type = RangeRequestHandler, host: str = "127.0.0.1",
                 port: int = 0) -> Iterator[str]:
    """Serves ``root`` from a thread for the duration of the block; yields its base URL (port 0: a free port)."""
    server = RangeServer((host, port), partial(handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, name="serve_shards", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the folder to serve (e.g. the OUT of make_shards.py)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if not os.path.isdir(args.root):
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    with serve_folder(os.path.abspath(args.root), host=args.host, port=args.port) as url:
        print(f"serving {args.root} at {url} (Ctrl-C stops)", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
