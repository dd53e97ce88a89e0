"""The dead-letter topic: records that cannot be processed, kept with the reason, never dropped."""

from __future__ import annotations

import logging

import faust

from autoglm import metrics, topics

log = logging.getLogger(__name__)


class DeadLetters:
    def __init__(self, app: faust.App):
        self.topic = app.topic(topics.DEAD_LETTERS, key_serializer="raw", value_serializer="raw")

    async def send(self, message, reason: str) -> None:
        """Publish the original key and value with headers naming the reason and the source record;
        returns once the broker has it, so the source record may then be acked."""
        headers = [("error", reason.encode()), ("source.topic", message.topic.encode()),
                   ("source.partition", str(message.partition).encode()),
                   ("source.offset", str(message.offset).encode())]
        delivery = await self.topic.send(key=message.key, value=message.value, headers=headers)
        await delivery
        metrics.DEAD_LETTERS.labels(reason.split(":")[0]).inc()
        log.warning("dead letter %s[%d]@%d: %s", message.topic, message.partition, message.offset, reason)
