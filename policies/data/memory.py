"""Which episodes to train on when the data outgrows a step budget (Sirius's memory management).

- keep_all: no budget, everything.
- fifo: keep the newest episodes (later stores, later start times).
- lfi: "least frequently intervened first out": drop the episodes with the fewest intervention
  steps first, keeping the ones humans corrected most.
- mfi: "most frequently intervened first out": drop the most-corrected episodes first.
Pure demonstration episodes are kept outside the budget when `keep_demos` (they are the anchor).
Ties break towards newer episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("keep_all", "fifo", "lfi", "mfi")


@dataclass(frozen=True)
class EpisodeRecord:
    order: int  # position in time across all stores: larger is newer
    length: int
    interventions: int
    is_demo: bool


def select_episodes(
    records: list[EpisodeRecord],
    strategy: str = "keep_all",
    budget_steps: int | None = None,
    keep_demos: bool = True,
) -> list[int]:
    """Indices into `records` to keep, in their original order."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown memory strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "keep_all" or budget_steps is None:
        return list(range(len(records)))
    if budget_steps <= 0:
        raise ValueError(f"memory budget must be a positive number of steps, got {budget_steps}")
    pinned = [i for i, r in enumerate(records) if keep_demos and r.is_demo]
    candidates = [i for i, r in enumerate(records) if not (keep_demos and r.is_demo)]
    rank = {
        "fifo": lambda i: -records[i].order,
        "lfi": lambda i: (-records[i].interventions, -records[i].order),
        "mfi": lambda i: (records[i].interventions, -records[i].order),
    }[strategy]
    kept, used = [], 0
    for i in sorted(candidates, key=rank):
        if used + records[i].length <= budget_steps:
            kept.append(i)
            used += records[i].length
    return sorted(pinned + kept)
