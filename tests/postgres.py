"""A private Debian PostgreSQL cluster for tests: logical replication on, trust auth, loopback only.

Its directory comes from tempfile (pytest's tmp dirs are 0700, out of the postgres user's reach);
as root the server runs as the postgres user, which refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from autoglm.broker import free_port


class PostgresCluster:
    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
        self.bin = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="autoglm-pg-"))
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.root / "data"), "-U", "postgres", "-A", "trust", "--no-sync",
                  "-E", "UTF8", "--locale=C.UTF-8")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                   "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10 -c fsync=off "
                   "-c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-w",
                  "-o", options, "start")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def sql(self, statement: str) -> str:
        """Run SQL with psql; returns its unaligned, tuples-only output."""
        result = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                                 "-v", "ON_ERROR_STOP=1", "-At", "-c", statement],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self.bin / program), *arguments]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
