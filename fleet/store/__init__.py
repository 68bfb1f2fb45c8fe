"""The zarr episode store (see episode_store.py for the layout and the crash-safety argument)."""

from fleet.store.episode_store import (
    EpisodeMeta,
    EpisodeStore,
    FieldSpec,
    OpenEpisode,
    Schema,
    StepError,
    StoreCorruptError,
    StoreError,
    check_schema,
)

__all__ = [
    "EpisodeMeta",
    "EpisodeStore",
    "FieldSpec",
    "OpenEpisode",
    "Schema",
    "StepError",
    "StoreCorruptError",
    "StoreError",
    "check_schema",
]
