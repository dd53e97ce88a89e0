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
"""

from __future__ import annotations

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from autoglm.settings import Settings

FETCH_MAX_WAIT_MS = 50


class _PromptConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by AIOKafkaConsumer.start()
        return consumer


class _PromptConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _PromptConsumerThread(self, loop=self.loop, beacon=self.beacon)


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
    app.transport.Consumer = _PromptConsumer
    return app
