"""The ``/metrics`` endpoint: the text exposition (``exposition.render``) over a WSGI
app, served from a thread per request so a client that stalls holds only its own thread.
It always answers in the text format 0.0.4, which every Prometheus accepts whatever it
asks for first, and gzips (at level 1: a tenth of the time of level 9 for ~1.5x the
bytes) when the client accepts it.

``--metrics ADDR`` means the same in ``record``, ``live``, ``replay`` and ``serve``:
``HOST:PORT``, ``[V6ADDR]:PORT`` or a bare ``PORT`` (loopback).  Loopback is the
default; any other address must be spelled out, and starting prints that the endpoint
has no authentication.
"""
from __future__ import annotations

import argparse
import gzip
import ipaddress
import socket
import ssl
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from typing import TYPE_CHECKING

from ..errors import VftraceError

if TYPE_CHECKING:       # prometheus_client only once an endpoint starts: --help stays fast
    from .tap import MetricsTap

DEFAULT_ADDRESS = "127.0.0.1:9435"
REQUEST_TIMEOUT_S = 10.0      # a client that connects and sends nothing is cut off then


class MetricsError(VftraceError):
    """The endpoint cannot be served: one line, exit 2."""


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """--metrics and --metrics-tls, for every command that can serve the endpoint."""
    g = parser.add_argument_group("Prometheus endpoint")
    g.add_argument("--metrics", metavar="ADDR", nargs="?", const=DEFAULT_ADDRESS,
                   help=f"serve Prometheus metrics at http://ADDR/metrics (no ADDR: "
                        f"{DEFAULT_ADDRESS}; another interface must be spelled out, e.g. "
                        "0.0.0.0:9435, and has no authentication)")
    g.add_argument("--metrics-tls", nargs=2, metavar=("CERT", "KEY"),
                   help="serve the endpoint over HTTPS with this certificate and key (PEM)")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` | ``[V6]:PORT`` | ``PORT`` -> (host, port); MetricsError if not."""
    text = text.strip()
    flag = f"--metrics {text!r}"
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise MetricsError(f"{flag}: give [IPV6]:PORT, e.g. [::1]:9435")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise MetricsError(f"{flag}: give HOST:PORT, e.g. {DEFAULT_ADDRESS} (or "
                               "0.0.0.0:9435 for every interface)")
        if ":" in host:
            raise MetricsError(f"{flag}: put an IPv6 address in brackets, e.g. [::1]:9435")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise MetricsError(f"{flag}: port {port_text!r} is not a number from 0 to 65535")
    return host, port


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S      # socket timeout: a stalled client frees its thread

    def log_message(self, format, *args):      # scrapes are not news
        pass


class MetricsEndpoint:
    """``/metrics`` over HTTP(S) for one tap, served until ``stop``."""

    def __init__(self, address: str, tap: MetricsTap, tls: tuple[str, str] | None = None):
        self.host, self.port = parse_address(address)
        self.tap, self.tls = tap, tls
        self._httpd = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}/metrics"

    def start(self) -> None:
        from prometheus_client.exposition import ThreadingWSGIServer

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

        context = None
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(*self.tls)
            except (OSError, ssl.SSLError) as e:
                raise MetricsError(f"--metrics-tls {' '.join(self.tls)}: cannot load the "
                                   f"certificate and key ({getattr(e, 'strerror', None) or e})") \
                    from None
        try:
            httpd = make_server(self.host, self.port, _app(self.tap), Server,
                                handler_class=_Handler)
        except OSError as e:
            raise MetricsError(f"--metrics {self.host}:{self.port}: cannot listen "
                               f"({e.strerror or e})") from None
        if context is not None:
            # The handshake on first read, in the request's own thread (with its
            # timeout): on accept it would let one silent client stall every scrape.
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True,
                                               do_handshake_on_connect=False)
        self.port = httpd.server_address[1]          # port 0: the one the kernel chose
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="vftrace-metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the socket; a scrape in flight ends with the process."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def notice(self) -> str:
        text = f"vftrace: Prometheus metrics at {self.url}"
        if not is_loopback(self.host):
            text += " (warning: not loopback, and the endpoint has no authentication)"
        return text


def _app(tap: MetricsTap):
    """The WSGI app: GET (any path, as prometheus_client's) is a scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector
    from prometheus_client.exposition import gzip_accepted
    from .exposition import render

    process = ProcessCollector(registry=None)   # process_resident_memory_bytes: serve's RSS

    def app(environ, start_response):
        method = environ["REQUEST_METHOD"]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [f"# use GET, not {method}\n".encode()]
        if environ.get("PATH_INFO") == "/favicon.ico":
            start_response("204 No Content", [])
            return [b""]
        body = render(tap.state(), (process,))
        headers = [("Content-Type", CONTENT_TYPE_LATEST)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body if method == "GET" else b""]

    return app


def start_endpoint(args, tap: MetricsTap) -> MetricsEndpoint | None:
    """The endpoint ``--metrics``/``--metrics-tls`` ask for (None without --metrics;
    ``check_metrics_args`` has refused a lone --metrics-tls), started, its address said
    on stderr."""
    if getattr(args, "metrics", None) is None:
        return None
    endpoint = MetricsEndpoint(args.metrics, tap, tuple(args.metrics_tls) if args.metrics_tls
                               else None)
    endpoint.start()
    print(endpoint.notice(), file=sys.stderr)
    return endpoint


def check_metrics_args(args) -> None:
    """Refuse a bad --metrics before anything slow (BPF compile) starts."""
    if getattr(args, "metrics", None) is not None:
        parse_address(args.metrics)
    elif getattr(args, "metrics_tls", None):
        raise MetricsError("--metrics-tls needs --metrics ADDR")
