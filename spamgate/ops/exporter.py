"""The HTTP endpoint beside the SMTP port: /metrics, /healthz and /readyz.

It runs on its own threads (the standard library's WSGI server with one thread per
request), never on the event loop that carries the SMTP sessions: rendering a
scrape, a scrape storm, or a client that connects and sends nothing cannot delay
an SMTP reply. /metrics is prometheus_client's own WSGI app (content negotiation,
gzip, `name[]` filters); /healthz and /readyz ask callables that answer from the
event loop with a timeout.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger("spamgate.exporter")

# (ok, text): 200 or 503, and a few lines for the human reading the answer.
Status = tuple[bool, str]

INDEX = b"spamgate: /metrics (Prometheus), /healthz (process), /readyz (ready for mail)\n"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of scrapes or probes beyond
    # that would wait a second for SYN retransmission.
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn() for the listen address: a
        # reverse DNS lookup, on the event loop's thread at startup. Not needed.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    # A connection that sends nothing is dropped after this many seconds, so idle
    # clients cannot pile up threads.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class Exporter:
    """Serves one registry and two status callables on `host:port`."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        health: Callable[[], Status],
        ready: Callable[[], Status],
    ) -> None:
        self.host, self.port = host, port
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        self._ready = ready
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._httpd is not None
        name = self._httpd.socket.getsockname()
        return name[0], name[1]

    def start(self) -> None:
        """Bind now (errors surface to the caller), then serve on a daemon thread."""
        server_class = _Server6 if ":" in self.host else _Server
        self._httpd = make_server(
            self.host, self.port, self._app, server_class=server_class, handler_class=_Handler
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="spamgate-exporter",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; blocks up to one poll interval (call it off the event loop)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _app(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b"use GET\n"]
        if path in ("/healthz", "/readyz"):
            probe = self._health if path == "/healthz" else self._ready
            try:
                ok, text = probe()
            except Exception as exc:  # a status page must answer, whatever broke
                log.exception("%s failed", path)
                ok, text = False, f"error: {type(exc).__name__}: {exc}"
            body = (("ok\n" if ok else "not ok\n") + text.rstrip("\n") + "\n").encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [INDEX]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; try /metrics, /healthz or /readyz\n"]
