"""Real CDC: a Postgres cluster, `autoglm cdc postgres` (Debezium in-process) and a worker.

Rows inserted, updated and deleted in Postgres become searchable or disappear through /search,
and a kill -9 of the CDC process mid-stream loses nothing: after a restart the index equals
the table.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from autoglm.process import die_with_parent
from tests.conftest import WorkerProcess, wait_until
from tests.postgres import PostgresCluster


@pytest.fixture(scope="module")
def postgres():
    cluster = PostgresCluster()
    cluster.sql("CREATE TABLE notes (id integer PRIMARY KEY, title text NOT NULL, body text)")
    yield cluster
    cluster.stop()


class CdcProcess:
    def __init__(self, postgres: PostgresCluster, broker: str, data_dir, log_path):
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "roles.cli", "cdc", "postgres", "--dsn", postgres.dsn, "--tables", "public.notes",
             "--topic-prefix", "cdc.pg", "--broker", broker, "--data-dir", str(data_dir), "--slot", "autoglm_test"],
            stdout=open(log_path, "a"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(30)


@pytest.fixture(scope="module")
def pipeline(postgres, broker, tmp_path_factory):
    root = tmp_path_factory.mktemp("pg")
    cdc = CdcProcess(postgres, broker, root / "cdc", root / "cdc.log")
    worker = WorkerProcess(broker, root / "data", root / "worker.log", ["--cdc-topics", r"^cdc\.pg\."]).wait_healthy()
    yield cdc, worker, root
    worker.stop()
    if cdc.process.poll() is None:
        cdc.stop()


def titles(worker: WorkerProcess, query: str) -> list[str]:
    return [hit["title"] for hit in worker.client.get("/search", params={"q": query, "log": "false"}).json()["hits"]]


def test_insert_update_delete_reach_search(postgres, pipeline):
    cdc, worker, _ = pipeline
    postgres.sql("INSERT INTO notes VALUES (1, 'Permafrost carbon release', 'Thawing soils emit methane.'),"
                 " (2, 'Coral reef bleaching', 'Heat stress expels algae.')")
    wait_until(lambda: worker.document("public.notes:2"), 60, 0.2, "the inserted rows to be indexed")
    assert "Permafrost carbon release" in titles(worker, "permafrost methane")
    assert worker.document("public.notes:1")["source"]["position"][0] == "pg"  # Debezium's sequence

    postgres.sql("UPDATE notes SET title = 'Permafrost thaw and methane' WHERE id = 1")
    wait_until(lambda: worker.document("public.notes:1")["title"] == "Permafrost thaw and methane", 30, 0.2,
               "the update")
    postgres.sql("DELETE FROM notes WHERE id = 2")
    wait_until(lambda: worker.document("public.notes:2") is None, 30, 0.2, "the delete")
    assert "Coral reef bleaching" not in titles(worker, "coral reef bleaching")
    assert cdc.process.poll() is None


def test_kill_9_mid_stream_then_restart_leaves_the_index_equal_to_the_table(postgres, pipeline, broker):
    cdc, worker, root = pipeline
    for start in range(100, 1100, 100):  # ten transactions of 100 rows, the CDC process killed during them
        postgres.sql(f"INSERT INTO notes SELECT n, 'Note ' || n, 'Body of note ' || n "
                     f"FROM generate_series({start}, {start + 99}) AS n")
        if start == 500:
            time.sleep(0.5)
            cdc.process.send_signal(signal.SIGKILL)
            cdc.process.wait(30)
    postgres.sql("UPDATE notes SET title = 'Edited ' || id WHERE id % 7 = 0 AND id >= 100")
    postgres.sql("DELETE FROM notes WHERE id % 11 = 0 AND id >= 100")
    restarted = CdcProcess(postgres, broker, root / "cdc", root / "cdc.log")
    pipeline_cdc = restarted
    try:
        rows = dict(line.split("|", 1) for line in postgres.sql("SELECT id, title FROM notes ORDER BY id").splitlines())
        wait_until(lambda: worker.metric("autoglm_documents") == len(rows), 120, 0.5,
                   f"the index to hold the table's {len(rows)} rows")
        time.sleep(2)  # anything still in flight would change the count or a title now
        assert worker.metric("autoglm_documents") == len(rows)
        for row_id in range(100, 1100):
            document = worker.document(f"public.notes:{row_id}")
            if str(row_id) in rows:
                assert document is not None and document["title"] == rows[str(row_id)], row_id
            else:
                assert document is None, row_id
    finally:
        pipeline_cdc.stop()
