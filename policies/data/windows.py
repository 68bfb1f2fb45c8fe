"""Training windows over one or more episode stores, loaded into memory.

A sample is anchored at step t of an episode (the step whose action the policy executes first):
observations of steps t-To+1..t, actions of steps t-To+1..t-To+Tp (Diffusion Policy's convention,
so the first To actions line up with the observed steps), and the goal at t. Windows that run over
an episode's edge repeat its first or last step, and `action_mask` marks them (0) so the loss
ignores them (policies/models/encoders.py: chunk_loss). The sample's weight is its label's weight at t.
The zero-motion holds that open a human takeover (policies/data/weighting.py: takeover_holds) are
found on the actions as the robot logged them, and left out: no window is anchored at one, and every
window masks them out of its loss like padding. Steps whose label the weighting gives 0 (robot steps
under hg_dagger) are left out the same way, and so are corrections their operator discarded (the
console's "discard my last correction": the episode's metadata lists them, `extra["discarded"]`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore
from policies.data.memory import EpisodeRecord, select_episodes
from policies.data.weighting import sample_weights, takeover_holds


@dataclass
class EpisodeData:
    """Steps of the selected episodes, concatenated, in RAM."""

    steps: dict[str, np.ndarray]  # obs keys, "action", "goal" (if any), "label"
    episode_ends: np.ndarray
    sources: list[tuple[str, int]] = field(default_factory=list)  # (store path, episode index) per episode
    holds: np.ndarray | None = None  # per step: left out of training (takeover holds, discarded corrections)
    discarded: int = 0  # steps of discarded corrections among the holds

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def bounds(self, episode: int) -> tuple[int, int]:
        return (int(self.episode_ends[episode - 1]) if episode else 0), int(self.episode_ends[episode])

    def summary(self) -> dict:
        labels = Counter(ControlLabel(int(code)).label_name for code in self.steps["label"])
        return {
            "stores": sorted({path for path, _ in self.sources}),
            "episodes": self.num_episodes,
            "steps": int(self.episode_ends[-1]) if self.num_episodes else 0,
            "labels": dict(labels),
            "takeover_holds": int(self.holds.sum()) - self.discarded if self.holds is not None else 0,
            "discarded_steps": self.discarded,
        }


def load_episodes(
    paths: Sequence[str],
    obs_keys: Sequence[str],
    memory: str = "keep_all",
    budget_steps: int | None = None,
    keep_demos: bool = True,
    extra_keys: Sequence[str] = (),
) -> EpisodeData:
    """Read the episodes the memory strategy keeps from `paths` (oldest store first)."""
    stores = [EpisodeStore.open(path) for path in paths]
    if not stores:
        raise ValueError("no episode stores given to train on")
    wanted = list(dict.fromkeys([*obs_keys, *extra_keys, "action", "label"]))
    records, where = [], []
    for store in stores:
        missing = [key for key in wanted if key not in (store.schema or {})]
        if missing:
            raise ValueError(
                f"{store.path} has no step key(s) {missing}; it has {sorted(store.schema or {})}"
            )
        labels = store.labels()
        start_times = store.meta_column("start_time")
        extras = store.meta_column("extra")
        for index, (start, end) in enumerate(
            zip(np.r_[0, store.episode_ends[:-1]], store.episode_ends, strict=True)
        ):
            episode_labels = labels[start:end]
            records.append(
                EpisodeRecord(
                    order=len(records),
                    length=int(end - start),
                    interventions=int(np.sum(episode_labels == ControlLabel.INTERVENTION)),
                    is_demo=bool(np.all(episode_labels == ControlLabel.DEMO)),
                )
            )
            where.append((store, index, float(start_times[index]), discarded_ranges(extras[index])))
    kept = select_episodes(records, memory, budget_steps, keep_demos)
    if not kept:
        raise ValueError(
            f"no episodes left to train on in {list(paths)} (memory={memory}, budget={budget_steps})"
        )
    has_goal = all("goal" in (store.schema or {}) for store in stores)
    keys = wanted + (["goal"] if has_goal else [])
    chunks: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for i in kept:
        store, index, _, _ = where[i]
        episode = store.episode(index, keys=keys)
        for key in keys:
            chunks[key].append(episode[key])
    lengths = [records[i].length for i in kept]
    steps = {key: np.concatenate(parts) for key, parts in chunks.items()}
    episode_ends = np.cumsum(lengths).astype(np.int64)
    # Before the trainer converts actions (e.g. to targets), while a hold is still a zero action.
    holds = takeover_holds(steps["label"], steps["action"], episode_ends)
    discarded = np.zeros_like(holds)
    for i, end in zip(kept, episode_ends, strict=True):
        start = end - records[i].length
        for first, last in where[i][3]:
            discarded[start + max(first, 0) : start + min(last, records[i].length)] = True
    holds |= discarded
    return EpisodeData(
        steps=steps,
        episode_ends=episode_ends,
        holds=holds,
        discarded=int(discarded.sum()),
        sources=[(str(where[i][0].path), where[i][1]) for i in kept],
    )


def discarded_ranges(extra: str) -> list[tuple[int, int]]:
    """[first, end) step ranges of an episode's discarded corrections, from its `extra` metadata JSON."""
    try:
        meta = json.loads(str(extra) or "{}")
    except ValueError:
        return []  # not ours (the store checks its own metadata when reading episodes)
    entries = meta.get("discarded", []) if isinstance(meta, dict) else []
    try:
        return [(int(entry["start"]), int(entry["end"])) for entry in entries]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"an episode's discarded corrections are malformed ({entries!r}): {err}") from None


def split_episodes(num_episodes: int, val_ratio: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Episode indices for training and validation (at least one training episode)."""
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    order = np.random.default_rng(seed).permutation(num_episodes)
    n_val = min(int(round(val_ratio * num_episodes)), num_episodes - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class WindowDataset(torch.utils.data.Dataset):
    """(observation history, action chunk, goal, weight) samples from some episodes of `data`."""

    def __init__(
        self,
        data: EpisodeData,
        episodes: np.ndarray,
        obs_keys: Sequence[str],
        n_obs_steps: int,
        horizon: int,
        weighting: str = "sirius",
    ):
        if horizon < n_obs_steps:
            raise ValueError(
                f"prediction horizon {horizon} is shorter than the observation horizon {n_obs_steps}"
            )
        self.data = data
        self.obs_keys = list(obs_keys)
        labels = data.steps["label"]
        holds = data.holds if data.holds is not None else np.zeros(len(labels), bool)
        # Steps that teach nothing: takeover holds, and steps the weighting gives 0 (robot steps under
        # hg_dagger). No window is anchored at one, so batches hold only samples that count, and every
        # window masks them out of its loss like padding, so no chunk imitates what the scheme distrusts.
        skip = holds | (sample_weights(labels, weighting) == 0)
        anchors, obs_index, action_index, inside = [], [], [], []
        for episode in episodes:
            start, end = data.bounds(int(episode))
            t = np.arange(start, end)
            t = t[~skip[t]]
            anchors.append(t)
            obs_index.append(np.clip(t[:, None] + np.arange(-n_obs_steps + 1, 1), start, end - 1))
            wanted = t[:, None] + np.arange(-n_obs_steps + 1, horizon - n_obs_steps + 1)
            clipped = np.clip(wanted, start, end - 1)
            action_index.append(clipped)
            inside.append((wanted >= start) & (wanted < end) & ~skip[clipped])
        if not anchors:
            raise ValueError("no episodes selected for this dataset")
        self.anchors = np.concatenate(anchors)
        self.obs_index = np.concatenate(obs_index)
        self.action_index = np.concatenate(action_index)
        self.action_mask = np.concatenate(inside).astype(np.float32)
        # Weights over the steps this dataset trains on, by the label at each anchor step.
        self.weights = sample_weights(labels[self.anchors], weighting)

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, i: int) -> dict:
        steps = self.data.steps
        sample = {
            "obs": {key: torch.from_numpy(steps[key][self.obs_index[i]]) for key in self.obs_keys},
            "action": torch.from_numpy(steps["action"][self.action_index[i]]),
            "action_mask": torch.from_numpy(self.action_mask[i]),
            "weight": torch.tensor(self.weights[i]),
        }
        if "goal" in steps:
            sample["goal"] = torch.from_numpy(steps["goal"][self.anchors[i]])
        return sample
