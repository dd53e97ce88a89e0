"""Publishing a BEIR dataset's corpus as a Debezium snapshot, and naming its documents.

A dataset's documents become rows of table ``beir.<dataset name>``, published as op "r"
(snapshot) events to ``cdc.beir.<dataset name>``: exactly what Debezium would publish for
such a table, so they go through the same ingest path as any database.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from autoglm import beir
from autoglm.debezium import change_event, producer, topic_for
from autoglm.topics import ensure_topics

SCHEMA = "beir"


def table_name(root: Path) -> str:
    return Path(root).resolve().name


def document_id(root: Path, corpus_id: str) -> str:
    return f"{SCHEMA}.{table_name(root)}:{corpus_id}"


def corpus_id(doc_id: str) -> str:
    return doc_id.split(":", 1)[1]


def publish_corpus(broker: str, root: Path, topic_prefix: str = "cdc", limit: int | None = None,
                   progress: bool = True) -> tuple[str, int]:
    """Publish the corpus (its first `limit` documents) as snapshot events; returns (topic, count)."""
    table = table_name(root)
    topic = topic_for(topic_prefix, SCHEMA, table)
    ensure_topics(broker, [topic])
    kafka = producer(broker)
    count = 0
    ts_ms = int(time.time() * 1000)
    for document in tqdm(beir.read_corpus(root), desc=f"publishing {table}", unit="doc", disable=not progress,
                         total=limit):
        if limit is not None and count >= limit:
            break
        key, value = change_event("r", SCHEMA, table, {"id": document.id}, lsn=count + 1, ts_ms=ts_ms,
                                  after={"id": document.id, "title": document.title, "text": document.text})
        kafka.produce(topic, key=key, value=value)
        kafka.poll(0)
        count += 1
    kafka.flush(60)
    return topic, count
