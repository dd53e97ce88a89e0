"""The example store in SQLite under the data dir: the embedded default, where the join, the
trainer and the store share one process (feedback/store.py says what a store does)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path

from feedback.examples import TrainingExample
from feedback.store import Window, example_from_dict, session_capped

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    example_id TEXT NOT NULL UNIQUE,
    session_id TEXT,
    body TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS windows (
    window_id INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    sessions INTEGER NOT NULL,
    dropped_by_session_cap INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS window_examples (
    window_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (window_id, seq)
);
CREATE TABLE IF NOT EXISTS rank_stats (
    rank INTEGER PRIMARY KEY,
    shown INTEGER NOT NULL DEFAULT 0,
    clicked INTEGER NOT NULL DEFAULT 0
);
"""


class SqliteExampleStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an example acked by the join survives a power loss
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def add(self, examples: list[TrainingExample]) -> int:
        """Store new examples; returns how many were new (the rest were duplicates)."""
        now = time.time()
        with self._lock, self._db:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO examples (example_id, session_id, body, created_at) VALUES (?, ?, ?, ?)",
                [(e.example_id, e.session_id, json.dumps(asdict(e)), now) for e in examples])
            return self._db.total_changes - before

    def resume(self) -> None:
        """One process owns an SQLite store (the data dir's lock): nothing can have changed."""

    def pending(self) -> int:
        """Examples not yet in any window."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM examples WHERE seq > ?",
                                    (self._last_seq(),)).fetchone()[0]

    def last_window(self) -> Window | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM windows ORDER BY window_id DESC LIMIT 1").fetchone()
        return Window(*row) if row else None

    def close_window(self, reason: str, max_session_share: float) -> Window | None:
        """Cut a window from every pending example, at most ceil(share * n) per session."""
        with self._lock, self._db:
            first = self._last_seq() + 1
            rows = self._db.execute("SELECT seq, session_id FROM examples WHERE seq >= ? ORDER BY seq",
                                    (first,)).fetchall()
            if not rows:
                return None
            kept, sessions = session_capped(rows, max_session_share)
            window_id = 1 + self._db.execute("SELECT COALESCE(MAX(window_id), 0) FROM windows").fetchone()[0]
            window = Window(window_id, first, rows[-1][0], len(kept), sessions, len(rows) - len(kept),
                            reason, time.time())
            self._db.execute("INSERT INTO windows VALUES (?, ?, ?, ?, ?, ?, ?, ?)", tuple(asdict(window).values()))
            self._db.executemany("INSERT INTO window_examples VALUES (?, ?)", [(window_id, s) for s in kept])
            return window

    def examples_in(self, window_id: int) -> list[TrainingExample]:
        with self._lock:
            rows = self._db.execute(
                "SELECT e.body FROM window_examples w JOIN examples e ON e.seq = w.seq"
                " WHERE w.window_id = ? ORDER BY e.seq", (window_id,)).fetchall()
        return [example_from_dict(json.loads(body)) for (body,) in rows]

    def add_rank_stats(self, shown_ranks: int = 0, clicked_rank: int | None = None) -> None:
        with self._lock, self._db:
            for rank in range(1, shown_ranks + 1):
                self._db.execute("INSERT INTO rank_stats (rank, shown) VALUES (?, 1) ON CONFLICT(rank)"
                                 " DO UPDATE SET shown = shown + 1", (rank,))
            if clicked_rank is not None:
                self._db.execute("INSERT INTO rank_stats (rank, clicked) VALUES (?, 1) ON CONFLICT(rank)"
                                 " DO UPDATE SET clicked = clicked + 1", (clicked_rank,))

    def rank_stats(self) -> tuple[dict[int, int], dict[int, int]]:
        with self._lock:
            rows = self._db.execute("SELECT rank, shown, clicked FROM rank_stats").fetchall()
        return {r: s for r, s, _ in rows}, {r: c for r, _, c in rows}

    def close(self) -> None:
        self._db.close()

    def _last_seq(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(last_seq), 0) FROM windows").fetchone()[0]

