"""The CDC stream processor: a Faust agent over Debezium topics feeding the ingest sink.

Records are read with acks disabled and acked only after the sink has made their batch
durable (see ``streams/ingest.py``), so Faust commits a Kafka offset only for records whose
effect is in the index. Records that cannot be read go to the dead-letter topic with the
reason and are acked once the dead letter is delivered; later records keep flowing.

Batching is greedy: the sink takes every record already waiting (up to ``batch_max``) and,
when there are few, lingers ``batch_linger_s`` for more, so an idle system answers in
milliseconds and a busy one encodes in large batches while the agent keeps reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Collection

import faust
from faust.types import TP

from autoglm import metrics, topics
from autoglm.events import BadEvent, Op, parse_change
from autoglm.settings import Settings
from search.protocol import Deletion, RefusedChanges
from streams.dead_letters import DeadLetters
from streams.ingest import Change, IngestSink, Truncate
from streams.mapping import Mapper

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """One record waiting for the sink: its parsed change, or why it is a dead letter."""

    event: Any  # faust EventT
    change: Change | None
    error: str | None


class CdcProcessor:
    """Parses records at the edge, batches them for the sink, acks what is durable."""

    def __init__(self, app: faust.App, settings: Settings, mapper: Mapper, sink: IngestSink):
        self.app = app
        self.settings = settings
        self.mapper = mapper
        self.sink = sink
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=4 * settings.batch_max)
        self.last_error: str | None = None
        self.topic = app.topic(*topics.matching_topics(settings.broker, settings.cdc_topics),
                               key_serializer="raw", value_serializer="raw")
        self.dead_letters = DeadLetters(app)
        self._stream = None
        self._channel = None
        app.agent(self.topic, name="cdc-ingest")(self._read)
        app.resume_offsets = self.resume_offsets
        app.task(self._run_sink)
        app.timer(settings.topic_refresh_s)(self._follow_new_topics)

    def resume_offsets(self, assigned: Collection[TP]) -> dict[TP, int]:
        """Where this processor's partitions resume: the offset the index recorded with its last
        durable batch, or the partition's start when it recorded none (a new or rebuilt index has
        applied nothing from it, whatever the consumer group committed)."""
        ours = set(self.topic.topics)
        durable = self.sink.index.committed_offsets()
        return {tp: durable.get(f"{tp.topic}:{tp.partition}", 0) for tp in assigned if tp.topic in ours}

    # -- edge: parse every record once -----------------------------------------------------

    def parse(self, key: bytes | None, value: bytes | None) -> Change | None:
        """The change a record asks for; None for a tombstone; BadEvent when unreadable."""
        event = parse_change(key, value)
        if event is None:
            metrics.RECEIVED.labels("tombstone").inc()
            return None
        metrics.RECEIVED.labels(event.op.value).inc()
        if event.op is Op.TRUNCATE:
            return Truncate(event.table, event.position, event.source_ts_ms)
        doc_id = self.mapper.document_id(event)
        if event.op is Op.DELETE:
            return Deletion(doc_id, event.table, event.position, event.source_ts_ms)
        return self.mapper.document(event, doc_id)

    async def _read(self, stream) -> None:
        self._channel = stream.channel  # the agent's own copy of self.topic, which Faust consumes
        self._stream = stream.noack()
        async for event in self._stream.events():
            try:
                pending = _Pending(event, self.parse(event.message.key, event.message.value), None)
            except BadEvent as exc:
                metrics.RECEIVED.labels("invalid").inc()
                pending = _Pending(event, None, str(exc))
            await self.queue.put(pending)

    # -- sink: batch, apply durably, then ack ------------------------------------------------

    async def _run_sink(self) -> None:
        """Per batch: deliver its dead letters, apply and commit its changes, then ack every record."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            offsets = {f"{p.event.message.topic}:{p.event.message.partition}": p.event.message.offset + 1
                       for p in batch}
            for pending in batch:
                if pending.error is not None:
                    await self._until_done("dead-letter delivery",
                                           lambda: self.dead_letters.send(pending.event.message, pending.error))
            changes = [p.change for p in batch if p.change is not None]

            async def apply() -> None:
                """Apply the batch; changes the index refuses for good become dead letters and
                the rest is applied again (the retry in _until_done)."""
                nonlocal changes
                try:
                    await loop.run_in_executor(None, self.sink.apply, changes, offsets)
                except RefusedChanges as refused:
                    for pending in batch:
                        reason = refused.reasons.get(getattr(pending.change, "id", None))
                        if reason is not None:
                            await self.dead_letters.send(pending.event.message, f"index refused the change: {reason}")
                    changes = [c for c in changes if getattr(c, "id", None) not in refused.reasons]
                    raise

            await self._until_done("ingest", apply)
            for pending in batch:
                await self._stream.ack(pending.event)

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.settings.batch_linger_s
        while len(batch) < self.settings.batch_max:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _until_done(self, step: str, attempt) -> None:
        """Nothing is acked before every step of its batch succeeded: retry failures with backoff.

        These are failures of the platform (storage, encoder, broker), not of the input, so
        the records are kept; /healthz reports the worker down while a step keeps failing.
        """
        delay = 0.5
        while True:
            try:
                await attempt()
                self.last_error = None
                return
            except Exception as exc:
                self.last_error = f"{step} failed, retrying: {exc!r}"
                log.exception("%s failed; retrying in %.1f s", step, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- topics created after start --------------------------------------------------------

    async def _follow_new_topics(self) -> None:
        """Subscribe to topics that started matching ``cdc_topics`` after the worker started.

        Faust cannot follow a pattern (faust#62), so the agent's topic gets the new names and
        Faust's conductor is told its subscription changed.
        """
        loop = asyncio.get_running_loop()
        try:
            names = await loop.run_in_executor(None, topics.matching_topics, self.settings.broker,
                                               self.settings.cdc_topics)
        except Exception as exc:
            log.warning("cannot list topics: %r", exc)
            return
        new = [name for name in names if name not in self.topic.topics]
        if new and self._channel is not None:
            log.info("subscribing to new CDC topics %s", new)
            for channel in {id(self.topic): self.topic, id(self._channel): self._channel}.values():
                channel.topics = [*channel.topics, *new]
            conductor = self.app.topics
            conductor._resubscribe_sleep_lock_seconds = 1.0
            conductor._flag_changes()
