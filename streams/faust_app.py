"""The Faust application every stream processor runs in, with the settings measured to work.

Settings (see ../shared/notes/broker.md): replication factor 1, a 6 s session timeout
and 1 s heartbeats (Faust's 60 s default delays the first assignment by ~30 s), offsets
from the earliest record for a new group, one record per producer batch (table recovery),
and no Faust web server.

Faust hard-codes aiokafka's ``fetch_max_wait_ms`` to 1500. A broker that answers a fetch
only when data reaches one of its partitions then holds new records on the others for up
to that long (measured: ~550 ms per event on a 4-partition topic with the embedded broker).
The consumer thread below lowers it, so an idle worker sees an event within milliseconds;
an idle fetch costs one small request per ``FETCH_MAX_WAIT_MS``.

Where a partition resumes: Faust seeks every assigned partition to the group's committed
Kafka offset. A processor that keeps its own durable record of progress (the CDC processor:
the index manifest, written before any Kafka commit) then moves its partitions to where that
record says (``app.resume_offsets``): it is the truth about what the index holds. A Kafka
offset that ran ahead of it (an index restored from a backup or rebuilt from scratch, offsets
reset by hand, a partition that moved between workers) would otherwise skip records the index
never applied; one that lags it would replay, and re-check, records already applied. The
processor checks its record against each partition's log first: a log that no longer reaches
it (a reset source) is read from its start (see ``streams/cdc.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Collection, Mapping

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from autoglm.settings import Settings

FETCH_MAX_WAIT_MS = 50

log = logging.getLogger(__name__)


class _PromptConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by AIOKafkaConsumer.start()
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    """Faust's consumer with a prompt fetch thread, resuming at the sink's durable offsets."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _PromptConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        """Seek to the committed Kafka offsets, then the partitions ``app.resume_offsets`` names
        to its offsets (see the module docstring). Faust calls this after every assignment and
        whenever it rewinds a paused consumer."""
        await super().perform_seek()
        loop = asyncio.get_running_loop()
        offsets = await loop.run_in_executor(None, self.app.resume_offsets, self.assignment())
        if not offsets:
            return
        for tp, offset in offsets.items():
            kafka_offset = self._committed_offset.get(tp)
            if kafka_offset is not None and kafka_offset > offset:
                log.warning("%s:%d resumes at offset %d, where the index's durable record ends, although "
                            "the consumer group committed %d: records in between are read again",
                            tp.topic, tp.partition, offset, kafka_offset)
        await self.seek_wait(offsets)  # on the consumer's own thread, like Faust's seeks
        # Faust commits only offsets past the one it believes committed, and only once the acked
        # offsets are contiguous with it: both now count from the resume offset.
        self._committed_offset.update({tp: offset or None for tp, offset in offsets.items()})


def _kafka_offsets(assigned: Collection[TP]) -> Mapping[TP, int]:
    """``app.resume_offsets``: given the assigned partitions, where those of a processor with its
    own durable record of progress resume (the next offset to read). By default none: every
    partition resumes at Kafka's offset."""
    return {}


def create_faust_app(app_id: str, settings: Settings) -> faust.App:
    app = faust.App(
        app_id,
        broker=f"kafka://{settings.broker}",
        store="memory://",
        autodiscover=False,
        datadir=str(settings.data_dir / "faust"),
        web_enabled=False,
        topic_replication_factor=1,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        broker_commit_interval=1.0,
        # One record per producer batch: with larger batches the embedded broker reports wrong
        # high watermarks and table recovery from changelogs silently loses records.
        producer_max_batch_size=1,
    )
    app.transport.Consumer = _Consumer
    app.resume_offsets = _kafka_offsets  # replaced by a processor with its own record (CdcProcessor)
    return app
