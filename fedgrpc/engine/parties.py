"""The parties of a run: who joined, with how many samples, and who is still active.

Guarded by the engine's lock (the table has none of its own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fedgrpc.errors import (
    DuplicateSubmissionError,
    ForbiddenError,
    InvalidUpdateError,
    LimitError,
)

log = logging.getLogger(__name__)


@dataclass
class PartyInfo:
    """What the engine knows of a joined party."""

    party_id: str
    num_samples: int
    active: bool = True  # counted when deciding whether every party has submitted
    joined_at: float = 0.0
    last_seen: float = 0.0


class PartyTable:
    """Joined parties by id; a bounded number may join."""

    def __init__(self, max_parties: int, clock: Callable[[], float]) -> None:
        self._max = max_parties
        self._clock = clock
        self._by_id: dict[str, PartyInfo] = {}
        self.evicted: set[str] = set()
        """Ids an operator evicted (``fedgrpc parties evict``): they cannot join."""

    def join(self, party_id: str, num_samples: int) -> bool:
        """Register or re-register a party; True when it is new or its count changed."""
        if num_samples <= 0:
            raise InvalidUpdateError(
                f"party {party_id} declared {num_samples} samples; need > 0"
            )
        if party_id in self.evicted:
            raise ForbiddenError(f"party {party_id} was evicted from this run")
        now = self._clock()
        info = self._by_id.get(party_id)
        changed = info is None or info.num_samples != num_samples
        if info is not None and changed and info.active:
            # Whoever can send a Join under an id must not re-weight (or, through
            # the sample-count check at upload, lock out) the party using it.
            raise DuplicateSubmissionError(
                f"party {party_id} is active with {info.num_samples} samples; a Join "
                f"cannot change it to {num_samples} (it can once the party has missed "
                "a round)"
            )
        if info is None:
            if len(self._by_id) >= self._max:
                raise LimitError(
                    f"party {party_id} cannot join: {self._max} parties already"
                )
            info = PartyInfo(party_id, num_samples, joined_at=now)
            self._by_id[party_id] = info
            log.info("party %s joined with %d samples", party_id, num_samples)
        info.num_samples = num_samples
        self.seen(info)
        return changed

    def get(self, party_id: str) -> PartyInfo | None:
        """The party, if it joined."""
        return self._by_id.get(party_id)

    def seen(self, info: PartyInfo) -> None:
        """The party is alive: it is waited for again."""
        info.active = True
        info.last_seen = self._clock()

    def ids(self) -> tuple[str, ...]:
        """Every joined party id, sorted."""
        return tuple(sorted(self._by_id))

    def active(self) -> set[str]:
        """Parties a round waits for."""
        return {p for p, i in self._by_id.items() if i.active}

    def deactivate(self, party_ids: Iterable[str]) -> None:
        """Stop waiting for these parties (they missed a round) until they are seen."""
        for p in party_ids:
            if p in self._by_id:
                self._by_id[p].active = False

    def total_samples(self) -> int:
        """Sum of every joined party's sample count."""
        return sum(i.num_samples for i in self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
