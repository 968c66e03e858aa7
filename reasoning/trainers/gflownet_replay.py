"""GFlowNet's replay buffer: per prompt, the best completions by untempered log-reward, deduplicated
exactly and by normalised edit distance (`trainers/gflownet.py` replays them; docs/gflownet.md)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def edit_distances(query: Sequence[int], others: Sequence[Sequence[int]]) -> np.ndarray:
    """Levenshtein distances between `query` and each of `others` (token sequences), `[K]`.

    One dynamic-programming row per query token, vectorised over the K others and their positions:
    D_i[j] = min(D_{i−1}[j] + 1, D_{i−1}[j−1] + [q_i ≠ b_j], D_i[j−1] + 1), the last (insertion)
    chain resolved with a running minimum of D_i[j] − j.
    """
    if not others:
        return np.zeros(0, dtype=np.int64)
    lengths = np.array([len(o) for o in others])
    width = int(lengths.max())
    table = np.full((len(others), width), -1, dtype=np.int64)
    for k, other in enumerate(others):
        table[k, : len(other)] = other
    index = np.arange(width + 1)
    previous = np.tile(index, (len(others), 1))
    for i, token in enumerate(query, start=1):
        best = np.minimum(previous[:, :-1] + (table != token), previous[:, 1:] + 1)
        current = np.concatenate([np.full((len(others), 1), i), best], axis=1)
        previous = np.minimum.accumulate(current - index, axis=1) + index
    return previous[np.arange(len(others)), lengths]


@dataclass
class ReplayEntry:
    """One stored completion with its untempered log-rewards (terminal and, for modified SubTB, per prefix)."""

    completion_ids: list[int]
    text: str
    finish_reason: str
    log_reward: float
    prefix_log_reward: list[float] | None = None
    correct: bool | None = None


class ReplayBuffer:
    """Per-prompt top-k buffer of completions by untempered log-reward, deduplicated.

    `add` rejects an exact duplicate (keeping the higher reward of the two) and, with
    `edit_distance` > 0, a near duplicate: an entry within edit distance ≤ `edit_distance` ×
    max(length) of the new one is replaced if the new one is better, else the new one is dropped.
    Each prompt keeps its `capacity` best entries. The row (dataset columns) of every prompt is kept
    so that replayed prompts can be scored and logged like fresh ones.
    """

    def __init__(self, capacity: int = 16, edit_distance: float = 0.0) -> None:
        self.capacity, self.edit_distance = capacity, edit_distance
        self.entries: dict[str, list[ReplayEntry]] = {}
        self.rows: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def prompts(self) -> list[str]:
        return [key for key, bucket in self.entries.items() if bucket]

    def add(self, key: str, row: dict[str, Any], entry: ReplayEntry) -> bool:
        """Insert `entry` for prompt `key`; True when the buffer changed."""
        bucket = self.entries.setdefault(key, [])
        self.rows.setdefault(key, dict(row))
        for existing in bucket:
            if existing.completion_ids == entry.completion_ids:
                if entry.log_reward > existing.log_reward:
                    existing.log_reward, existing.prefix_log_reward = (
                        entry.log_reward,
                        entry.prefix_log_reward,
                    )
                    bucket.sort(key=lambda e: -e.log_reward)
                    return True
                return False
        if len(bucket) >= self.capacity and entry.log_reward <= bucket[-1].log_reward:
            return False
        if self.edit_distance > 0 and bucket:
            distances = edit_distances(entry.completion_ids, [e.completion_ids for e in bucket])
            sizes = np.array([max(len(e.completion_ids), len(entry.completion_ids), 1) for e in bucket])
            near = np.flatnonzero(distances <= self.edit_distance * sizes)
            if len(near):
                closest = int(near[np.argmin(distances[near])])
                if entry.log_reward <= bucket[closest].log_reward:
                    return False
                bucket[closest] = entry
                bucket.sort(key=lambda e: -e.log_reward)
                return True
        bucket.append(entry)
        bucket.sort(key=lambda e: -e.log_reward)
        del bucket[self.capacity :]
        return True

    def sample(self, key: str, n: int, rng: random.Random) -> list[ReplayEntry]:
        """`n` entries of prompt `key`: without replacement when there are enough, else with."""
        bucket = self.entries[key]
        if len(bucket) >= n:
            return rng.sample(bucket, n)
        return list(bucket) + [rng.choice(bucket) for _ in range(n - len(bucket))]

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "edit_distance": self.edit_distance,
            "entries": {k: [asdict(e) for e in v] for k, v in self.entries.items()},
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity, self.edit_distance = state["capacity"], state["edit_distance"]
        self.entries = {k: [ReplayEntry(**e) for e in v] for k, v in state["entries"].items()}
        self.rows = dict(state["rows"])
