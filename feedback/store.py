"""Where training examples and the windows cut from them are kept: the interface, apart from
its backends (feedback/sqlite_store.py for the embedded default, feedback/elasticsearch_store.py
when several learners share the work).

The join adds examples (a replayed record adds nothing: example ids are unique) and closes a
window when enough have accumulated; the trainer reads a window's examples. Closing a window
caps each session's share of it, so one user or bot cannot dominate. Window ids count up from 1
and are never reused, whichever process closes the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Protocol, TypeVar

from feedback.examples import TrainingExample

Item = TypeVar("Item", bound=Hashable)


@dataclass(frozen=True)
class Window:
    window_id: int
    first_seq: int
    last_seq: int
    examples: int
    sessions: int
    dropped_by_session_cap: int
    reason: str  # "size" or "time"
    created_at: float


class ExampleStore(Protocol):
    def add(self, examples: list[TrainingExample]) -> int:
        """Store new examples durably; returns how many were new (the rest were duplicates)."""

    def pending(self) -> int:
        """Examples not yet in any window."""

    def resume(self) -> None:
        """Re-read what another process may have changed since this one opened the store: called
        when this process becomes the join's owner (a standby learner taking over)."""

    def last_window(self) -> Window | None:
        ...

    def close_window(self, reason: str, max_session_share: float) -> Window | None:
        """Cut a window from every pending example, at most ceil(share * n) per session; None
        when nothing is pending."""

    def examples_in(self, window_id: int) -> list[TrainingExample]:
        ...

    def add_rank_stats(self, shown_ranks: int = 0, clicked_rank: int | None = None) -> None:
        """Count an impression's shown ranks, or one click at a rank (for log-estimated propensities)."""

    def rank_stats(self) -> tuple[dict[int, int], dict[int, int]]:
        """(rank -> times shown, rank -> times clicked)."""

    def close(self) -> None:
        ...


def session_capped(rows: Iterable[tuple[Item, str | None]], max_session_share: float) -> tuple[list[Item], int]:
    """The items of (item, session) rows that fit the cap of ceil(share * n) per session, in
    order, and how many sessions the rows came from (no session counts as one)."""
    rows = list(rows)
    cap = max(1, math.ceil(max_session_share * len(rows)))
    taken: dict[str | None, int] = {}
    kept = []
    for item, session in rows:
        if session is not None and taken.get(session, 0) >= cap:
            continue
        taken[session] = taken.get(session, 0) + 1
        kept.append(item)
    return kept, len(taken)


def example_from_dict(body: dict) -> TrainingExample:
    return TrainingExample(**{**body, "negative_ids": tuple(body["negative_ids"])})
