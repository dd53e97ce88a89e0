"""Publishing platform events (impressions, feedback, training requests) as JSON to Kafka.

Produce calls never block a request: delivery happens in librdkafka's background thread,
failures are counted in metrics and logged, and ``close`` flushes what is in flight.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import Counter
from pydantic import BaseModel

log = logging.getLogger(__name__)

PUBLISHED = Counter("autoglm_published", "Platform events published, by topic and outcome",
                    ["topic", "outcome"])


class EventPublisher:
    def __init__(self, broker: str):
        self._producer = Producer({"bootstrap.servers": broker, "enable.idempotence": True,
                                   "linger.ms": 5, "log_level": 3})

    def publish(self, topic: str, key: str, event: BaseModel) -> None:
        """Queue one event; when the local queue is full (broker down for long) it is dropped and counted."""
        try:
            self._producer.produce(topic, key=key.encode(), value=event.model_dump_json().encode(),
                                   on_delivery=self._delivered)
        except BufferError:
            PUBLISHED.labels(topic, "dropped").inc()
            log.error("producer queue full; event to %s dropped", topic)
        self._producer.poll(0)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for deliveries; returns how many are still in flight."""
        return self._producer.flush(timeout)

    close = flush

    @staticmethod
    def _delivered(error: KafkaError | None, message: Message) -> None:
        PUBLISHED.labels(message.topic(), "failed" if error else "delivered").inc()
        if error:
            log.error("event to %s not delivered: %s", message.topic(), error)
