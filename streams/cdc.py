"""The CDC stream processor: a Faust agent over Debezium topics feeding the ingest sink.

Records are read with acks disabled and acked only after the sink has made their batch
durable (see ``streams/ingest.py``), so Faust commits a Kafka offset only for records whose
effect is in the index or whose dead letter is delivered.

Every failure is either the input's (permanent) or the platform's (transient, ``is_transient``:
the broker, memory, or the index's store as its backend judges it). A permanent one costs its record only: the record goes
to the dead-letter topic with the reason and the partition keeps flowing. A transient one is
retried with backoff and nothing is acked meanwhile; /healthz names the step that is retrying.

Commit protocol of one batch, in this order:

1. deliver the dead letters of the records that could not be read (any exception while parsing
   or mapping one, not only ``BadEvent``);
2. apply the changes and commit them with the batch's offsets (``IngestSink.apply``);
3. only if that failed permanently: find the culprits, the changes the index refuses
   (``RefusedChanges``) or, by bisection, those that fail when applied alone (the parts that
   succeed are committed without offsets); deliver their dead letters; then commit the batch's
   offsets with no change (whatever fails in this commit is the platform's, and is retried);
4. ack every record of the batch.

Batching is greedy: the sink takes every record already waiting (up to ``batch_max``) and,
when there are few, lingers ``batch_linger_s`` for more, so an idle system answers in
milliseconds and a busy one encodes in large batches while the agent keeps reading.

Where a partition resumes is the index's record (``resume_offsets``), checked against the log:
a log that ends below it belongs to a reset source (an in-memory broker restarted, a topic
deleted and recreated), so the partition is read again from its start; replaying it is safe
because changes are ordered by their source position.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, TypeVar

import faust
from aiokafka.errors import KafkaError
from confluent_kafka import KafkaException
from faust.exceptions import ProducerSendError
from faust.types import TP

from autoglm import metrics, topics
from autoglm.events import BadEvent, Op, parse_change
from autoglm.settings import Settings
from search.protocol import Deletion, RefusedChanges
from streams.dead_letters import DeadLetters
from streams.ingest import Change, IngestSink, Truncate
from streams.mapping import Mapper

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures of the platform around the index: the broker, the network (OSError covers connection
# errors and timeouts), memory. The index backend names its own (``Index.is_unavailable``).
_PLATFORM_ERRORS = (OSError, MemoryError, KafkaException, KafkaError, ProducerSendError)


@dataclass
class _Pending:
    """One record waiting for the sink: its parsed change, or why it is a dead letter."""

    event: Any  # faust EventT
    change: Change | None
    error: str | None


@dataclass
class Retrying:
    """A step that keeps failing, as /healthz shows it: no exception text (the log has the
    traceback), which may quote records or paths."""

    step: str
    since: float  # time.monotonic() of the first failure
    attempts: int
    error_type: str

    def describe(self) -> str:
        return (f"{self.step} retrying for {time.monotonic() - self.since:.0f} s after {self.attempts} "
                f"failed attempts ({self.error_type})")


class CdcProcessor:
    """Parses records at the edge, batches them for the sink, acks what is durable."""

    def __init__(self, app: faust.App, settings: Settings, mapper: Mapper, sink: IngestSink):
        self.app = app
        self.settings = settings
        self.mapper = mapper
        self.sink = sink
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=4 * settings.batch_max)
        self.retrying: Retrying | None = None
        self.topic = app.topic(*topics.matching_topics(settings.broker, settings.cdc_topics),
                               key_serializer="raw", value_serializer="raw")
        self.dead_letters = DeadLetters(app, settings.dead_letter_max_bytes)
        self._stream = None
        self._channel = None
        self._warned: set[tuple[TP, int]] = set()
        app.agent(self.topic, name="cdc-ingest")(self._read)
        app.resume_offsets = self.resume_offsets
        app.task(self._run_sink)
        app.timer(settings.topic_refresh_s)(self._follow_new_topics)

    # -- where partitions resume ------------------------------------------------------------

    def resume_offsets(self, assigned: Collection[TP]) -> dict[TP, int]:
        """Where this processor's partitions resume: the offset the index recorded with its last
        durable batch, or the partition's start when it recorded none (a new or rebuilt index has
        applied nothing from it, whatever the consumer group committed) or when the log no
        longer reaches it (``_checked_against_log``)."""
        ours = set(self.topic.topics)
        durable = self.sink.index.committed_offsets()
        recorded = {tp: durable.get(f"{tp.topic}:{tp.partition}", 0) for tp in assigned if tp.topic in ours}
        return self._checked_against_log(recorded)

    def _checked_against_log(self, recorded: dict[TP, int]) -> dict[TP, int]:
        """The recorded offsets, except where the partition's log does not reach them
        (``_resume_point``); unchanged when the broker cannot be asked."""
        to_check = [tp for tp, offset in recorded.items() if offset > 0]
        if not to_check:
            return recorded
        try:
            bounds = topics.log_bounds(self.settings.broker, [(tp.topic, tp.partition) for tp in to_check])
            return {**recorded, **{tp: self._resume_point(tp, recorded[tp], *bounds[(tp.topic, tp.partition)])
                                   for tp in to_check}}
        except KafkaException as exc:
            log.warning("cannot check the recorded offsets against the broker's logs (%s); resuming at them", exc)
            return recorded

    def _resume_point(self, tp: TP, offset: int, start: int, end: int) -> int:
        """Where a partition whose log spans [start, end) resumes, given the index's offset:
        - a log ending below it (confirmed by reading the record before it, since the embedded
          broker may report too low an end) belongs to a reset source: read it from its start;
        - a log starting above it lost records before the index applied them: read from its start."""
        if offset > end and not topics.holds_record(self.settings.broker, tp.topic, tp.partition, offset - 1):
            self._warn_once(tp, offset, "%s:%d: the index resumes at offset %d but the partition's log ends at %d: "
                                        "the source was reset (broker restarted empty, topic recreated); reading "
                                        "the partition again from its start, offset %d",
                            tp.topic, tp.partition, offset, end, start)
            return start
        if offset < start:
            self._warn_once(tp, offset, "%s:%d: the index resumes at offset %d but the partition's log starts at %d: "
                                        "records in between were deleted before they were indexed and may be "
                                        "missing; reading on from offset %d",
                            tp.topic, tp.partition, offset, start, start)
            return start
        return offset

    def _warn_once(self, tp: TP, offset: int, message: str, *args) -> None:
        """Warn about a partition's record once, not again on every rebalance until it changes."""
        if (tp, offset) not in self._warned:
            self._warned.add((tp, offset))
            log.warning(message, *args)

    # -- edge: parse every record once -----------------------------------------------------

    def parse(self, key: bytes | None, value: bytes | None, offset: int | None = None) -> Change | None:
        """The change a record asks for; None for a tombstone; BadEvent when unreadable."""
        event = parse_change(key, value, offset=offset)
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

    def _pending(self, event) -> _Pending:
        """The record parsed, or the reason it cannot be: whatever parsing raises costs this record only."""
        message = event.message
        try:
            return _Pending(event, self.parse(message.key, message.value, message.offset), None)
        except BadEvent as exc:
            reason = str(exc)
        except Exception as exc:
            log.exception("reading %s[%d]@%d failed", message.topic, message.partition, message.offset)
            reason = f"{type(exc).__name__} while reading the record: {exc}"
        metrics.RECEIVED.labels("invalid").inc()
        return _Pending(event, None, reason)

    async def _read(self, stream) -> None:
        self._channel = stream.channel  # the agent's own copy of self.topic, which Faust consumes
        self._stream = stream.noack()
        async for event in self._stream.events():
            await self.queue.put(self._pending(event))

    # -- sink: batch, apply durably, then ack ------------------------------------------------

    async def _run_sink(self) -> None:
        """Each batch through the commit protocol of the module docstring."""
        while True:
            batch = await self._next_batch()
            offsets = {f"{p.event.message.topic}:{p.event.message.partition}": p.event.message.offset + 1
                       for p in batch}
            for pending in batch:
                if pending.error is not None:
                    await self._dead_letter(pending, pending.error)
            await self._ingest([p for p in batch if p.change is not None], offsets)
            for pending in batch:
                await self._stream.ack(pending.event)

    async def _ingest(self, changed: list[_Pending], offsets: dict[str, int]) -> None:
        """Steps 2 and 3 of the commit protocol."""
        try:
            await self._until_done("ingest", lambda: self._apply(changed, offsets), retry=self.is_transient)
            return
        except Exception as exc:
            failure = exc
        culprits = await self._until_done("isolating the failed changes", lambda: isolate_culprits(
            changed, failure, lambda part: self._apply(part, {}), lambda p: getattr(p.change, "id", None),
            self.is_transient))
        for pending, reason in culprits:
            await self._dead_letter(pending, reason)
        await self._until_done("ingest", lambda: self._apply([], offsets))

    def is_transient(self, exc: BaseException) -> bool:
        """A failure of the platform that a retry can cure; anything else is blamed on the input."""
        return isinstance(exc, _PLATFORM_ERRORS) or self.sink.index.is_unavailable(exc)

    async def _apply(self, pending: list[_Pending], offsets: dict[str, int]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.sink.apply, [p.change for p in pending], offsets)

    async def _dead_letter(self, pending: _Pending, reason: str) -> None:
        await self._until_done("dead-letter delivery", lambda: self.dead_letters.send(pending.event.message, reason))

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

    async def _until_done(self, step: str, attempt: Callable[[], Awaitable[T]],
                          retry: Callable[[Exception], bool] = lambda exc: True) -> T:
        """Retry a step's failures that ``retry`` accepts, with backoff, and raise the others.

        Nothing is acked before every step of its batch succeeded, so the records are kept;
        meanwhile ``retrying`` says which step keeps failing, for /healthz.
        """
        delay = 0.5
        while True:
            try:
                result = await attempt()
                self.retrying = None
                return result
            except Exception as exc:
                if not retry(exc):
                    self.retrying = None
                    raise
                if self.retrying is None or self.retrying.step != step:
                    self.retrying = Retrying(step, time.monotonic(), 0, type(exc).__name__)
                self.retrying.attempts += 1
                self.retrying.error_type = type(exc).__name__
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


async def isolate_culprits(items: list[T], failure: Exception, apply: Callable[[list[T]], Awaitable[None]],
                           refused_id: Callable[[T], str | None],
                           is_transient: Callable[[BaseException], bool]) -> list[tuple[T, str]]:
    """The items to blame for ``failure`` of applying ``items``, with the reason: those the index
    refused (``RefusedChanges`` names them by ``refused_id``), else, by bisection, those that fail
    when applied alone. The parts that succeed stay applied; a transient failure is raised."""
    if isinstance(failure, RefusedChanges):
        return [(item, f"index refused the change: {failure.reasons[refused_id(item)]}") for item in items
                if refused_id(item) in failure.reasons]
    if not items:
        return []  # nothing to blame: the platform's failure, retried by the caller
    if len(items) == 1:
        log.error("a change failed for good", exc_info=failure)
        return [(items[0], f"ingest failed: {type(failure).__name__}: {failure}")]
    found: list[tuple[T, str]] = []
    half = len(items) // 2
    for part in (items[:half], items[half:]):
        try:
            await apply(part)
        except Exception as exc:
            if is_transient(exc):
                raise
            found += await isolate_culprits(part, exc, apply, refused_id, is_transient)
    return found
