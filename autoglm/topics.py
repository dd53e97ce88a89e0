"""Topic names the platform owns, and the admin calls that create and find topics.

Every topic is created explicitly before use: some brokers auto-create unknown topics
with their own defaults on first produce, which would silently change partitioning.
"""

from __future__ import annotations

import re

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

DEAD_LETTERS = "autoglm.dlq"
IMPRESSIONS = "autoglm.impressions"
FEEDBACK = "autoglm.feedback"
TRAINING = "autoglm.training"
CLOCK = "autoglm.clock"  # empty ticks that wake the feedback processor when no events come

PLATFORM_TOPICS = (DEAD_LETTERS, IMPRESSIONS, FEEDBACK, TRAINING, CLOCK)


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
    missing = [NewTopic(name, num_partitions=partitions, replication_factor=1)
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
