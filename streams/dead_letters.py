"""The dead-letter topic: records that cannot be processed, kept with the reason, never dropped.

A dead letter always fits. One larger than the configured limit (key, value and headers
together), or one the producer or the broker refuses as too large, is sent as a reference
instead: the first ``REFERENCE_BYTES`` of its key and value, with headers giving the original
sizes and sha256 digests. A huge bad record then costs one small letter; a send retried
forever would stop its partition.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import faust
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from autoglm import metrics, topics
from autoglm.settings import Settings

log = logging.getLogger(__name__)

REFERENCE_BYTES = 65_536
REMEMBERED_LETTERS = 100_000  # records whose letter this process remembers having sent
MAX_REASON_CHARS = 2_000  # a reason quoting its input must not make the letter too large itself
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)

Headers = list[tuple[str, bytes]]


class DeadLetters:
    def __init__(self, app: faust.App, max_bytes: int = Settings.dead_letter_max_bytes):
        self.topic = app.topic(topics.DEAD_LETTERS, key_serializer="raw", value_serializer="raw")
        self.max_bytes = max_bytes
        self._sent: OrderedDict[tuple, None] = OrderedDict()  # records lettered by this process, newest last

    async def send(self, message, reason: str) -> None:
        """Publish the original key and value (or a reference to them, see the module docstring)
        with headers naming the reason and the source record; returns once the broker has it,
        so the source record may then be acked.

        A record this process has already dead-lettered is not sent again: a rebalance or a seek
        can deliver it twice. After a restart it is (at-least-once: a letter per delivering run)."""
        record = _identity(message)
        if record in self._sent:
            log.info("%s[%d]@%d was dead-lettered already", message.topic, message.partition, message.offset)
            return
        headers = [("error", reason[:MAX_REASON_CHARS].encode()), ("source.topic", message.topic.encode()),
                   ("source.partition", str(message.partition).encode()),
                   ("source.offset", str(message.offset).encode())]
        key, value = message.key, message.value
        if _size(key, value, headers) > self.max_bytes:
            await self._deliver(*_reference(key, value, headers))
        else:
            try:
                await self._deliver(key, value, headers)
            except Exception as exc:
                if not _is_too_large(exc):
                    raise
                log.warning("dead letter of %s[%d]@%d refused as too large (%r); sending a reference",
                            message.topic, message.partition, message.offset, exc)
                await self._deliver(*_reference(key, value, headers))
        self._sent[record] = None
        if len(self._sent) > REMEMBERED_LETTERS:
            self._sent.popitem(last=False)
        metrics.DEAD_LETTERS.labels(reason.split(":")[0][:100]).inc()
        log.warning("dead letter %s[%d]@%d: %s", message.topic, message.partition, message.offset,
                    reason[:MAX_REASON_CHARS])

    async def _deliver(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        delivery = await self.topic.send(key=key, value=value, headers=headers)
        await delivery


def _identity(message) -> tuple:
    """Where a record sits and a digest of what it holds: a reset source reuses offsets for
    other records."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (message.key, message.value):
        digest.update(b"\x00" if part is None else b"\x01" + len(part).to_bytes(8, "big") + part)
    return message.topic, message.partition, message.offset, digest.digest()


def _size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    return len(key or b"") + len(value or b"") + sum(len(name) + len(raw) for name, raw in headers)


def _reference(key: bytes | None, value: bytes | None,
               headers: Headers) -> tuple[bytes | None, bytes | None, Headers]:
    """The first REFERENCE_BYTES of key and value, with the original size and sha256 of each."""
    described = list(headers)
    for name, data in (("key", key), ("value", value)):
        if data is not None:
            described += [(f"original.{name}.size", str(len(data)).encode()),
                          (f"original.{name}.sha256", hashlib.sha256(data).hexdigest().encode())]
    return (None if key is None else key[:REFERENCE_BYTES],
            None if value is None else value[:REFERENCE_BYTES], described)


def _is_too_large(exc: BaseException | None) -> bool:
    """Whether a send failed because the record is too large (Faust wraps the producer's error)."""
    while exc is not None:
        if isinstance(exc, _TOO_LARGE):
            return True
        exc = exc.__cause__
    return False
