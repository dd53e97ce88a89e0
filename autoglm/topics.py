"""Topic names the platform owns, the admin calls that create and find topics, and probes of
where a partition's log starts and ends.

Every topic is created explicitly before use: some brokers auto-create unknown topics
with their own defaults on first produce, which would silently change partitioning.
"""

from __future__ import annotations

import re
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

DEAD_LETTERS = "autoglm.dlq"
IMPRESSIONS = "autoglm.impressions"
FEEDBACK = "autoglm.feedback"
TRAINING = "autoglm.training"
CLOCK = "autoglm.clock"  # empty ticks that wake the feedback processor when no events come
ONLINE = "autoglm.online"  # the learner's online metrics and guard verdicts, newest per key

PLATFORM_TOPICS = (DEAD_LETTERS, IMPRESSIONS, FEEDBACK, TRAINING, CLOCK, ONLINE)
COMPACTED = (ONLINE,)  # only the newest record per key matters


def admin_client(broker: str) -> AdminClient:
    # librdkafka's own log would repeat what the raised KafkaException already says.
    return AdminClient({"bootstrap.servers": broker, "socket.timeout.ms": 5000, "log_level": 0})


def list_topics(broker: str, timeout: float = 5.0) -> set[str]:
    """Names of the topics on the cluster; raises KafkaException when it does not answer."""
    return set(admin_client(broker).list_topics(timeout=timeout).topics)


def ensure_topics(broker: str, names: list[str] | tuple[str, ...], partitions: int = 1) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    admin = admin_client(broker)
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [NewTopic(name, num_partitions=partitions, replication_factor=1,
                        config={"cleanup.policy": "compact"} if name in COMPACTED else {})
               for name in names if name not in existing]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=10).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


def matching_topics(broker: str, pattern: str) -> list[str]:
    """Topics whose names match the regular expression, sorted.

    Stream subscriptions are made to explicit names, never to a broker-side pattern:
    Faust's ``pattern=`` topics subscribe to nothing (faust-streaming/faust#62).
    """
    regex = re.compile(pattern)
    return sorted(name for name in list_topics(broker) if regex.search(name))


def _reader(broker: str) -> Consumer:
    """A consumer that only reads assigned partitions: it never joins or commits for a group."""
    return Consumer({"bootstrap.servers": broker, "group.id": "autoglm-log-probe", "enable.auto.commit": False,
                     "auto.offset.reset": "error", "socket.timeout.ms": 5000, "log_level": 0})


def log_bounds(broker: str, partitions: list[tuple[str, int]],
               timeout: float = 5.0) -> dict[tuple[str, int], tuple[int, int]]:
    """(start, end) offsets of each partition's log as the broker reports them. The embedded
    broker may report an end below the real one (last batch's base offset + 1): confirm an end
    that matters with ``holds_record``."""
    consumer = _reader(broker)
    try:
        return {(topic, partition): consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
                for topic, partition in partitions}
    finally:
        consumer.close()


def holds_record(broker: str, topic: str, partition: int, offset: int, timeout: float = 3.0) -> bool:
    """Whether the partition's log holds a record at ``offset`` (or after it, where compaction
    removed that one), found by reading there; False when the offset is out of range or nothing
    comes within ``timeout``."""
    consumer = _reader(broker)
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = consumer.poll(min(remaining, 0.5))
            if message is None:
                continue
            if message.error() is None:
                return message.offset() >= offset
            if message.error().code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
                return False
        return False
    finally:
        consumer.close()
