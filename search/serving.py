"""Which query encoder answers a request: the champion, or for a sticky share of sessions the challenger.

The arms are held in one immutable pair that a swap replaces with one reference assignment. A
request picks its arm once and uses that encoder to the end, so requests in flight finish on
the model they started with and no answer mixes two models.

The split is sticky: a session (or, without one, a query) hashes to a fixed point in [0, 1),
and it sees the challenger when that point falls under the challenger's share. The same
session therefore stays on one arm for as long as the challenger and its share stay the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

CHAMPION = "champion"
CHALLENGER = "challenger"
ARMS = (CHAMPION, CHALLENGER)


class QueryEncoder(Protocol):
    version: str

    def embed_one(self, text: str) -> np.ndarray:
        ...


@dataclass(frozen=True)
class Arm:
    name: str
    encoder: QueryEncoder


@dataclass(frozen=True)
class _Arms:
    champion: QueryEncoder
    challenger: QueryEncoder | None


class ServedModels:
    """The champion and the optional challenger, swappable while requests run."""

    def __init__(self, champion: QueryEncoder, challenger: QueryEncoder | None = None,
                 challenger_share: float = 0.05):
        if not 0.0 <= challenger_share <= 1.0:
            raise ValueError(f"challenger share must be within [0, 1], got {challenger_share}")
        self.challenger_share = challenger_share
        self._arms = _Arms(champion, challenger)

    @property
    def champion(self) -> QueryEncoder:
        return self._arms.champion

    @property
    def challenger(self) -> QueryEncoder | None:
        return self._arms.challenger

    def encoder(self, arm: str) -> QueryEncoder | None:
        return self._arms.champion if arm == CHAMPION else self._arms.challenger

    def choose(self, sticky_key: str) -> Arm:
        """The arm for a request: the challenger for ``challenger_share`` of keys, always the same ones."""
        arms = self._arms  # one read: a concurrent swap cannot split this request across models
        if arms.challenger is not None and sticky_point(sticky_key) < self.challenger_share:
            return Arm(CHALLENGER, arms.challenger)
        return Arm(CHAMPION, arms.champion)

    def swap(self, arm: str, encoder: QueryEncoder | None) -> None:
        """Serve ``encoder`` on ``arm`` from the next request on; None removes the challenger."""
        if arm == CHAMPION:
            if encoder is None:
                raise ValueError("the champion arm always has an encoder")
            self._arms = _Arms(encoder, self._arms.challenger)
        elif arm == CHALLENGER:
            self._arms = _Arms(self._arms.champion, encoder)
        else:
            raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")


def sticky_point(key: str) -> float:
    """A uniform point in [0, 1) fixed by the key (SHA-256, so independent of Python's hash seed)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
