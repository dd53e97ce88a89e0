"""MLflow webhooks for alias moves: registering the worker's receiver, and checking deliveries.

MLflow signs each delivery with HMAC-SHA256 over ``"<delivery id>.<timestamp>.<body>"`` and the
webhook's secret, and sends ``X-MLflow-Signature: v1,<base64>`` with ``X-MLflow-Delivery-Id``
and ``X-MLflow-Timestamp`` (mlflow/webhooks/delivery.py). A delivery with a wrong signature, or a
timestamp too far from now (a replay), is refused. The server needs a stable secret-encryption
key and must allow loopback receivers (registry/server.py sets both).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from mlflow import MlflowClient

ALIAS_EVENTS = ["model_version_alias.created", "model_version_alias.deleted"]
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
MAX_SKEW_SECONDS = 300


@dataclass(frozen=True)
class AliasHook:
    """The receiver the API's /hooks/mlflow hands deliveries to: checks each with the secret MLflow
    signs with, and on an authentic one calls ``on_alias_moved`` (the follower's wake)."""

    secret: str
    on_alias_moved: Callable[[], None]
    headers: tuple[str, ...] = (SIGNATURE_HEADER, DELIVERY_ID_HEADER, TIMESTAMP_HEADER)

    def receive(self, headers: Mapping[str, str], body: bytes) -> str | None:
        reason = rejection(self.secret, headers, body)
        if reason is None:
            self.on_alias_moved()
        return reason


def webhook_secret(path: Path) -> str:
    """The receiver's shared secret, made once and kept (mode 0600) in the data dir."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(secrets.token_urlsafe(32))
        except FileExistsError:
            pass  # another process made it first
    return path.read_text().strip()


def receiver_name(receiver_url: str) -> str:
    """One webhook per serving replica, named after the URL it is reached at, so replicas never
    replace each other's and a restart replaces its own (MLflow names: letters, digits, ``.-_``,
    under 63 characters)."""
    return "autoglm-serving-" + hashlib.sha256(receiver_url.encode()).hexdigest()[:16]


def register_receiver(tracking_uri: str, name: str, url: str, secret: str) -> str:
    """Create the webhook ``name`` for alias events, replacing an older one of that name (a
    restart on another port); returns its id."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for webhook in client.list_webhooks():
        if webhook.name == name:
            client.delete_webhook(webhook.webhook_id)
    return client.create_webhook(name, url, ALIAS_EVENTS, description="Open-AutoGLM serving follows aliases",
                                 secret=secret).webhook_id


def unregister_receiver(tracking_uri: str, webhook_id: str) -> None:
    """One quick attempt, at shutdown: `autoglm up` stops its MLflow server at the same time, and
    the client's default retries would hold the worker past its stop deadline. A webhook left
    behind is replaced at the next start (same name)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # the process is exiting; read per request
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).delete_webhook(webhook_id)


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def rejection(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str | None:
    """Why a delivery must be refused, or None when it is authentic and fresh."""
    lowered = {name.lower(): value for name, value in headers.items()}
    sent, delivery_id, timestamp = (lowered.get(name.lower()) for name in
                                    (SIGNATURE_HEADER, DELIVERY_ID_HEADER, TIMESTAMP_HEADER))
    if not (sent and delivery_id and timestamp):
        return f"missing {SIGNATURE_HEADER}, {DELIVERY_ID_HEADER} or {TIMESTAMP_HEADER}"
    if not re.fullmatch(r"[0-9]{1,12}", timestamp) or abs((now or time.time()) - int(timestamp)) > MAX_SKEW_SECONDS:
        return f"timestamp {timestamp!r} is more than {MAX_SKEW_SECONDS} s from now"
    expected = signature(secret, delivery_id, timestamp, body)
    if not hmac.compare_digest(sent.encode("utf-8", "replace"), expected.encode()):
        return "signature does not match"
    return None
