"""The search API's limits, as a client meets them: oversized bodies, too many feedback items, long
queries, oversized webhooks, slow clients and too many requests at once.

The app runs in uvicorn in this process (the worker's server setup, short timeouts), over a real
index, encoder and broker; one slow test checks that the worker takes the limits from its options.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import uvicorn

from autoglm.broker import free_port
from autoglm.encoder import Encoder
from autoglm.publisher import EventPublisher
from autoglm.settings import ApiLimits
from registry import webhooks
from registry.webhooks import AliasHook
from search.api import create_app
from search.embedded import EmbeddedIndex
from search.limits import client_limits_protocol
from search.protocol import Document, Upsert
from search.query import SearchService
from search.serving import ServedModels

SECRET = "test-secret"
LIMITS = ApiLimits(header_timeout_s=0.5, body_timeout_s=1.0, max_concurrent_requests=3)  # default sizes


class InProcessApi:
    def __init__(self, broker: str, index_dir, limits: ApiLimits):
        self.alias_moves = 0
        self.index, self.publisher = EmbeddedIndex(index_dir), EventPublisher(broker)
        app = create_app(SearchService(self.index, ServedModels(Encoder())), lambda: {"index": None},
                         self.publisher, AliasHook(SECRET, self._alias_moved), limits=limits)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", http=client_limits_protocol(limits.header_timeout_s)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def _alias_moved(self) -> None:
        self.alias_moves += 1

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.publisher.close()
        self.index.close()


@pytest.fixture(scope="module")
def api(broker, tmp_path_factory):
    running = InProcessApi(broker, tmp_path_factory.mktemp("limits") / "index", LIMITS)
    yield running
    running.close()


def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def reply(sock: socket.socket) -> tuple[int | None, dict, float]:
    """Status and JSON body of what the server sends before it closes (None: closed without a
    reply), and the seconds that took."""
    started, received = time.monotonic(), b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    if not received:
        return None, {}, time.monotonic() - started
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}, time.monotonic() - started


def headers(method: str, path: str, *lines: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: api", *lines, "", ""]).encode()


def feedback(**overrides) -> dict:
    return {"event_id": str(uuid.uuid4()), "query_id": "q-limits", "doc_id": "d:1", "type": "click",
            "position": 1, **overrides}


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent(api):
    sock = connect(api.port, headers("POST", "/feedback", "Content-Type: application/json",
                                     f"Content-Length: {10 * 1024 * 1024}"))
    status, body, took = reply(sock)
    assert status == 413 and "over the limit" in body["error"] and took < LIMITS.body_timeout_s


def test_a_10_mb_feedback_list_is_refused(api):
    events = [feedback(session_id="x" * 200) for _ in range(30_000)]
    response = api.client.post("/feedback", json=events)
    assert response.status_code == 413


def test_a_chunked_body_is_refused_once_it_passes_the_limit(api):
    sock = connect(api.port, headers("POST", "/feedback", "Content-Type: application/json",
                                     "Transfer-Encoding: chunked"))
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    for _ in range(LIMITS.max_body_bytes // 65536 + 1):
        sock.sendall(chunk)
    status, body, _ = reply(sock)
    assert status == 413 and "over the limit" in body["error"]


def test_more_feedback_items_than_the_limit_are_refused_before_validation(api):
    response = api.client.post("/feedback", json=[{}] * 100_000)
    assert response.status_code == 413 and "limit is 1000" in response.json()["error"]
    assert len(response.content) < 200


def test_a_422_lists_the_first_rejections_and_counts_all(api):
    response = api.client.post("/feedback", json=[feedback()] + [{}] * 999)
    body = response.json()
    assert response.status_code == 422 and body["rejected_count"] == 999
    assert [item["index"] for item in body["rejected"]] == list(range(1, 21))
    assert len(response.content) < 10_000


def test_the_limit_of_feedback_items_is_accepted(api):
    response = api.client.post("/feedback", json=[feedback() for _ in range(LIMITS.max_feedback_items)])
    assert response.status_code == 202 and response.json() == {"accepted": LIMITS.max_feedback_items}


def test_a_query_longer_than_the_limit_is_refused(api):
    assert api.client.get("/search", params={"q": "a" * LIMITS.max_query_chars, "log": "false"}).status_code == 200
    response = api.client.get("/search", params={"q": "a" * (LIMITS.max_query_chars + 1)})
    assert response.status_code == 422 and "at most 2000 characters" in response.json()["error"]


def signed_delivery(body: bytes) -> dict:
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()))
    return {webhooks.SIGNATURE_HEADER: webhooks.signature(SECRET, delivery_id, timestamp, body),
            webhooks.DELIVERY_ID_HEADER: delivery_id, webhooks.TIMESTAMP_HEADER: timestamp}


def test_a_webhook_body_over_its_limit_is_refused_before_its_signature_is_checked(api):
    moves = api.alias_moves
    small = b'{"event": "model_version_alias.created"}'
    assert api.client.post("/hooks/mlflow", content=small, headers=signed_delivery(small)).status_code == 200
    assert api.alias_moves == moves + 1
    large = b'{"pad": "%s"}' % (b" " * LIMITS.max_webhook_body_bytes)  # under the body limit of other paths
    response = api.client.post("/hooks/mlflow", content=large, headers=signed_delivery(large))
    assert response.status_code == 413 and api.alias_moves == moves + 1


def test_a_client_slow_to_send_its_headers_gets_408(api):
    sock = connect(api.port, b"GET /healthz HTTP/1.1\r\nHost: api\r\n")
    status, body, took = reply(sock)
    assert status == 408 and "headers" in body["error"] and took < LIMITS.header_timeout_s + 1


def test_a_connection_that_sends_nothing_is_closed(api):
    status, _, took = reply(connect(api.port))
    assert status in (408, None) and took < LIMITS.header_timeout_s + 1


def test_a_body_shorter_than_its_content_length_gets_408(api):
    sock = connect(api.port, headers("POST", "/feedback", "Content-Type: application/json",
                                     "Content-Length: 100") + b"[{")
    status, body, took = reply(sock)
    assert status == 408 and "body" in body["error"] and took < LIMITS.body_timeout_s + 1


def test_a_body_dripped_slowly_gets_408_within_the_body_timeout(api):
    sock = connect(api.port, headers("POST", "/feedback", "Content-Type: application/json",
                                     "Content-Length: 100"))
    started = time.monotonic()
    while not select.select([sock], [], [], 0.05)[0]:  # a byte every 50 ms: each read is quick, the body is not
        sock.sendall(b" ")
        assert time.monotonic() - started < LIMITS.body_timeout_s + 1, "no reply while the body dripped"
    status, body, _ = reply(sock)
    assert status == 408 and "body" in body["error"]


def test_requests_beyond_the_concurrency_limit_get_503_with_retry_after(api):
    holders = [connect(api.port, headers("POST", "/feedback", "Content-Length: 10")) for _ in range(3)]
    time.sleep(0.2)  # the server has taken them in
    busy = api.client.get("/search", params={"q": "protein", "log": "false"})
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert api.client.get("/healthz").status_code == 200 and api.client.get("/metrics").status_code == 200
    for holder in holders:
        assert reply(holder)[0] == 408
    assert api.client.get("/search", params={"q": "protein", "log": "false"}).status_code == 200


@pytest.mark.slow
def test_the_worker_takes_its_limits_from_its_options(start_worker):
    worker = start_worker(extra_args=["--api-max-query-chars", "8", "--api-max-body", "2000",
                                      "--api-header-timeout", "1"])
    assert worker.client.get("/search", params={"q": "123456789"}).status_code == 422
    assert worker.client.post("/feedback", json=[feedback()] * 20).status_code == 413
    status, _, took = reply(connect(worker.port, b"GET /healthz HTTP/1.1\r\n"))
    assert status == 408 and took < 2


def test_a_session_id_longer_than_feedback_accepts_is_refused_and_an_unloggable_answer_still_served(api):
    session = "s" * 300
    assert api.client.get("/search", params={"q": "corals", "session": session}).status_code == 422
    assert api.client.get("/search", params={"q": "corals"}, headers={"X-Session-Id": session}).status_code == 422
    # A document stored before ids had a limit: its answer cannot become an impression, and is served anyway.
    long_id = "public.legacy:" + "x" * 300
    vector = np.zeros(384, dtype=np.float32)
    vector[0] = 1.0
    api.index.write_batch([Upsert(Document(long_id, "public.legacy", "Coral spawning", "Reef corals spawn."),
                                  vector)], [])
    api.index.commit({})
    answer = api.client.get("/search", params={"q": "coral spawning", "mode": "bm25"})
    assert answer.status_code == 200 and long_id in [hit["id"] for hit in answer.json()["hits"]]
