"""Limits on what one client can make the search API hold: bytes, time, and requests in flight.

Without them one careless or hostile client takes the API from everyone else:
- Request bodies (413): FastAPI reads a whole body into memory and parses it before any check
  of ours runs, so a 10 MB /feedback list was parsed and validated item by item.
- Webhook bodies (413): /hooks/mlflow hashes the whole body to check its signature, so an
  unsigned 100 MB body cost the work of a signed one; MLflow's deliveries are a few hundred bytes.
- Body read time (408): a Content-Length larger than the body sent, or a body dripped a byte at a
  time, held the request (and its slot below) open forever.
- Header read time (408): uvicorn times out idle keep-alive connections only, never one that is
  still sending its request line and headers (slowloris).
- Requests in flight (503 with Retry-After): beyond a few dozen, requests only queue behind two
  cores until clients time out; a refusal that says when to come back is cheaper for both.
  /healthz and /metrics are exempt: a busy API is up, and probes and scrapes must see it so.

The body is read here, within both limits, before the application sees the request; it is then
replayed to the application in one message. The header timeout and the close after a refusal
belong to the connection: ClientLimitsProtocol, uvicorn's h11 protocol with both.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from autoglm.settings import ApiLimits

WEBHOOK_PATH = "/hooks/mlflow"
UNTHROTTLED_PATHS = frozenset({"/healthz", "/metrics"})
RETRY_AFTER_S = 1
LINGER_S = 2.0  # how long a refused client's remaining body is read and dropped before the close


class Refused(Exception):
    """A request broke a limit: answer it with this status and close the connection."""

    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status, self.error = status, error


class ApiLimitsMiddleware:
    """ASGI middleware: a bound on requests in flight, then the body read within size and time limits."""

    def __init__(self, app, limits: ApiLimits):
        self.app, self.limits = app, limits
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in UNTHROTTLED_PATHS:
            await self.within_body_limits(scope, receive, send)
            return
        if self.in_flight >= self.limits.max_concurrent_requests:
            await refuse(send, Refused(503, f"more than {self.limits.max_concurrent_requests} requests "
                                            f"in flight; retry after {RETRY_AFTER_S} s"),
                         [(b"retry-after", str(RETRY_AFTER_S).encode())])
            return
        self.in_flight += 1
        try:
            await self.within_body_limits(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def within_body_limits(self, scope, receive, send) -> None:
        try:
            body = await self.read_body(scope, receive)
        except Refused as refusal:
            await refuse(send, refusal)
            return
        if body is not None:
            await self.app(scope, replay(body, receive), send)

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when the client went away while sending it."""
        limit = (self.limits.max_webhook_body_bytes if scope["path"] == WEBHOOK_PATH
                 else self.limits.max_body_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > limit:  # h11 has refused non-numeric lengths
            raise Refused(413, f"request body of {int(declared)} bytes is over the limit of {limit}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise Refused(408, f"request body not received within {self.limits.body_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > limit:
                raise Refused(413, f"request body is over the limit of {limit} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive() that hands the application the body read, then waits on the client as before."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_replayed():
        return pending.pop() if pending else await receive()

    return receive_replayed


async def refuse(send, refusal: Refused, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A JSON error reply that closes the connection, so what is left of the body is never read
    as a next request."""
    body = json.dumps({"error": refusal.error}).encode()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class ClientLimitsProtocol(H11Protocol):
    """uvicorn's h11 protocol with the limits only a connection can enforce.

    A client gets header_timeout_s to send its request line and headers (from connecting, or
    from the first byte of a later request on a kept-alive connection); then 408 and a close.
    A connection refused while its body is still arriving closes lingering: the reply goes out,
    the write side is shut, and what the client still sends is read and dropped for LINGER_S at
    most. A plain close makes the kernel answer unread data with a reset, which can destroy the
    reply before the client has read it.
    """

    header_timeout_s: float

    def connection_made(self, transport) -> None:
        self._raw_transport, self._lingering = transport, False
        super().connection_made(_TransportClosedBy(transport, self._close))
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)
        waiting_for_headers = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting_for_headers:
            self._cancel_header_timer()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            body = json.dumps({"error": f"request headers not received within {self.header_timeout_s:g} s"})
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body.encode()))
            self.transport.close()

    def _close(self) -> None:
        raw = self._raw_transport
        if self._lingering or raw.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            raw.close()
            return
        self._lingering = True
        raw.resume_reading()
        raw.write_eof()  # once the reply is written
        self.loop.call_later(LINGER_S, raw.close)


class _TransportClosedBy:
    """An asyncio transport whose close() is the protocol's own."""

    def __init__(self, transport, close):
        self._transport, self.close = transport, close

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def client_limits_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """The protocol class to pass as uvicorn.Config(http=...)."""
    return type("ClientLimitsProtocol", (ClientLimitsProtocol,), {"header_timeout_s": header_timeout_s})
