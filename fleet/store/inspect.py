"""`flotilla info PATH`: what is in an episode store, for a person or (json=true) a script."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.schema import ConfigError, check, register_job
from fleet.labels import ControlLabel
from fleet.store.episode_store import EpisodeStore, StoreError


@dataclass
class InfoConfig:
    """`flotilla info PATH` (configs/info.yaml)."""

    path: str | None = None  # the episode store to summarize (`flotilla info PATH` sets it)
    json: bool = False  # print machine-readable JSON instead of the table

    def __post_init__(self):
        check(
            bool(self.path),
            "path",
            "missing: give the store's path, e.g. `flotilla info data/push_demos.zarr`",
        )


register_job("info", InfoConfig)


def summarize(store: EpisodeStore) -> dict:
    codes = store.labels()
    label_counts = {label.label_name: int(np.count_nonzero(codes == label)) for label in ControlLabel}
    success = store.meta_column("success")
    lengths = np.diff(store.episode_ends, prepend=0)
    return {
        "path": str(store.path),
        "episodes": store.num_episodes,
        "steps": store.num_steps,
        "mean_episode_length": float(lengths.mean()) if lengths.size else 0.0,
        "success_rate": float(success.mean()) if success.size else None,
        "labels": label_counts,
        "outcomes": dict(Counter(str(o) for o in store.meta_column("outcome"))),
        "tasks": dict(Counter(str(t) for t in store.meta_column("task"))),
        "robots": len(set(str(r) for r in store.meta_column("robot_id"))),
        "policy_versions": sorted(set(str(v) for v in store.meta_column("policy_version"))),
        "keys": {
            key: {"shape": list(spec.shape), "dtype": str(spec.dtype), "image": spec.is_image}
            for key, spec in (store.schema or {}).items()
        },
        "size_bytes": store.size_on_disk(),
    }


def format_summary(summary: dict) -> str:
    steps = max(summary["steps"], 1)
    rate = "n/a" if summary["success_rate"] is None else f"{100 * summary['success_rate']:.1f}%"
    lines = [
        f"store            {summary['path']}",
        f"episodes         {summary['episodes']}",
        f"steps            {summary['steps']}  (mean episode length {summary['mean_episode_length']:.1f})",
        f"success rate     {rate}",
        f"size on disk     {_human_bytes(summary['size_bytes'])}",
        f"tasks            {_counts(summary['tasks'])}",
        f"outcomes         {_counts(summary['outcomes'])}",
        f"robots           {summary['robots']}    policy versions: {', '.join(summary['policy_versions']) or '-'}",
        "labels",
    ]
    lines += [
        f"  {name:<18} {count:>9}  {100 * count / steps:5.1f}%" for name, count in summary["labels"].items()
    ]
    lines.append("keys")
    width = max((len(key) for key in summary["keys"]), default=0)
    for key, spec in summary["keys"].items():
        kind = "image, 1 frame/chunk" if spec["image"] else "low-dim"
        lines.append(f"  {key:<{width}}  {str(tuple(spec['shape'])):<14} {spec['dtype']:<8} {kind}")
    return "\n".join(lines)


def _counts(counter: dict) -> str:
    return ", ".join(f"{key or '-'}: {value}" for key, value in sorted(counter.items())) or "-"


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def run(cfg: InfoConfig) -> None:
    if not Path(cfg.path).exists():
        raise ConfigError("path", f"{cfg.path} does not exist")
    try:
        with EpisodeStore.open(cfg.path) as store:
            summary = summarize(store)
    except StoreError as err:
        raise ConfigError("path", str(err)) from None
    print(json.dumps(summary, indent=2) if cfg.json else format_summary(summary))
