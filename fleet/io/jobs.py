"""`flotilla export`, `flotilla import` and `flotilla view`: their settings and entry points.

flotilla export STORE format=diffusion_policy out=X.zarr [state_keys=[ee_pos,gripper]] [camera=front]
flotilla export STORE format=lerobot out=DIR [video=true] [fps=10]
flotilla import SRC format=diffusion_policy|lerobot out=STORE [+cameras.img=front] [+keys.keypoint=kp]
flotilla view STORE [episode=N] [out=PREFIX]
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from configs.schema import MISSING, ConfigError, check, check_choice, check_int, register_job
from fleet.io.common import DataIOError, MissingExtraError, finish_output, start_output
from fleet.store.episode_store import EpisodeStore, StepError, StoreError

FORMATS = ("diffusion_policy", "lerobot")
# A file every dataset of the format has: an existing `out` is replaced only if it holds one.
_MARKER = {"diffusion_policy": ".zgroup", "lerobot": "meta/info.json"}


def _check_path(path: str | None, job: str, example: str) -> None:
    check(bool(path), "path", f"missing: give it first, e.g. `flotilla {job} {example}`")


@dataclass
class ExportConfig:
    """`flotilla export STORE format=... out=...` (configs/export.yaml)."""

    path: str | None = None  # the episode store to export (`flotilla export STORE` sets it)
    format: str = MISSING  # diffusion_policy | lerobot
    out: str = MISSING  # the dataset folder to write
    overwrite: bool = False  # replace an existing dataset at `out`
    # Low-dim observation keys concatenated (flattened, in this order) into DP's `state` and LeRobot's
    # `observation.state`; None: every low-dim observation key of the store, in schema order.
    state_keys: list[str] | None = None
    camera: str | None = None  # diffusion_policy: the camera whose frames become `img` (None: the first)
    video: bool = False  # lerobot: cameras as one mp4 per camera (PyAV) instead of PNG in parquet
    fps: int | None = None  # lerobot: frames per second (None: the episodes' control_hz, else timestamps)
    robot_type: str = "unknown"  # lerobot: info.json's robot_type
    progress: bool = True

    def __post_init__(self):
        _check_path(self.path, "export", "data/push.zarr format=lerobot out=push_lerobot")
        check_choice(self.format, FORMATS, "format")
        check(bool(self.out), "out", "must be a folder path")
        check_int(self.fps, "fps", 1, none_ok=True)


@dataclass
class ImportConfig:
    """`flotilla import SRC format=... out=STORE` (configs/import.yaml)."""

    path: str | None = None  # the dataset to import (`flotilla import SRC` sets it)
    format: str = MISSING  # diffusion_policy | lerobot
    out: str = MISSING  # the episode store to create
    overwrite: bool = False  # replace an existing episode store at `out`
    # Renames: source array (DP) or feature (LeRobot) -> episode-store key; an empty name drops it.
    keys: dict[str, str] = field(default_factory=dict)
    # diffusion_policy: image array -> camera name (`img` -> `front` makes `front_rgb`); an image array
    # not named here becomes `<its name>_rgb`, except `img`, which becomes `front_rgb` (Flotilla's default).
    cameras: dict[str, str] = field(default_factory=dict)
    fps: int = 10  # diffusion_policy: steps per second, for timestamps when the dataset has none
    # diffusion_policy: the task name of every episode (not `task`: that is the sim tasks' config group)
    task_name: str = "imported"
    # lerobot: a boolean column marking human intervention (None: the first of lerobot.INTERVENTION_KEYS
    # present); without one, and without Flotilla's control_label, every step is `demo`.
    intervention_key: str | None = None
    progress: bool = True

    def __post_init__(self):
        _check_path(self.path, "import", "pusht.zarr format=diffusion_policy out=data/pusht.zarr")
        check_choice(self.format, FORMATS, "format")
        check(bool(self.out), "out", "must be an episode store path")
        check_int(self.fps, "fps", 1)


@dataclass
class ViewConfig:
    """`flotilla view STORE [episode=N]` (configs/view.yaml)."""

    path: str | None = None  # the episode store (`flotilla view STORE` sets it)
    episode: int = 0  # which episode (negative counts from the end)
    out: str | None = None  # PREFIX: writes PREFIX.mp4 and PREFIX.png (None: <store>_episode<N> beside it)
    keys: list[str] | None = None  # low-dim keys to plot (None: action and the low-dim observations)
    camera: str | None = None  # camera key for the mp4 (None: the first image key; no mp4 without one)
    fps: int | None = None  # mp4 frame rate (None: as for export)

    def __post_init__(self):
        _check_path(self.path, "view", "data/push.zarr episode=3")
        check_int(self.episode, "episode")
        check_int(self.fps, "fps", 1, none_ok=True)


for _job, _config in (("export", ExportConfig), ("import", ImportConfig), ("view", ViewConfig)):
    register_job(_job, _config)


def _open_store(path: str) -> EpisodeStore:
    if not Path(path).exists():
        raise ConfigError("path", f"{path} does not exist")
    try:
        return EpisodeStore.open(path)
    except StoreError as err:
        raise ConfigError("path", str(err)) from None


def export(cfg: ExportConfig) -> None:
    store = _open_store(cfg.path)
    started = time.perf_counter()
    try:
        try:
            partial = start_output(cfg.out, cfg.overwrite, _MARKER[cfg.format])
        except DataIOError as err:  # out exists: the setting to change is out (or overwrite)
            raise ConfigError("out", str(err)) from None
        try:
            if cfg.format == "diffusion_policy":
                from fleet.io.diffusion_policy import export_diffusion_policy

                summary = export_diffusion_policy(store, partial, cfg.state_keys, cfg.camera, cfg.progress)
            else:
                from fleet.io.lerobot import export_lerobot

                summary = export_lerobot(
                    store, partial, cfg.state_keys, cfg.video, cfg.fps, cfg.robot_type, cfg.progress
                )
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        finish_output(partial, cfg.out)
    except MissingExtraError as err:
        raise ConfigError("format", str(err)) from None
    except (DataIOError, StoreError) as err:
        raise ConfigError("path", str(err)) from None
    finally:
        store.close()
    seconds = time.perf_counter() - started
    print(
        f"exported {summary['episodes']} episodes, {summary['steps']} steps to {cfg.out} "
        f"({cfg.format}) in {seconds:.1f} s"
        + (f"; fps {summary['fps']} ({summary['fps_source']})" if "fps" in summary else "")
    )


def import_(cfg: ImportConfig) -> None:
    if not Path(cfg.path).exists():
        raise ConfigError("path", f"{cfg.path} does not exist")
    started = time.perf_counter()
    try:
        if cfg.format == "diffusion_policy":
            from fleet.io.diffusion_policy import read_diffusion_policy

            count, episodes = read_diffusion_policy(cfg.path, cfg.keys, cfg.cameras, cfg.fps, cfg.task_name)
        else:
            from fleet.io.lerobot import read_lerobot

            count, episodes = read_lerobot(cfg.path, cfg.keys, cfg.intervention_key)
        from fleet.io.common import write_episodes

        with write_episodes(cfg.out, episodes, cfg.overwrite, count, cfg.progress) as store:
            episodes_done, steps = store.num_episodes, store.num_steps
    except MissingExtraError as err:
        raise ConfigError("format", str(err)) from None
    except (DataIOError, StepError) as err:
        raise ConfigError("path", f"{cfg.path}: {err}" if cfg.path not in str(err) else str(err)) from None
    except StoreError as err:
        raise ConfigError("out", str(err)) from None
    print(
        f"imported {episodes_done} episodes, {steps} steps from {cfg.path} ({cfg.format}) into {cfg.out} "
        f"in {time.perf_counter() - started:.1f} s"
    )


def view(cfg: ViewConfig) -> None:
    from fleet.io.view import write_view

    store = _open_store(cfg.path)
    try:
        written = write_view(store, cfg.episode, cfg.out, cfg.keys, cfg.camera, cfg.fps)
    except (DataIOError, IndexError, KeyError) as err:
        raise ConfigError(
            "episode" if isinstance(err, IndexError) else "path", str(err).strip("'\"")
        ) from None
    finally:
        store.close()
    print("wrote " + ", ".join(str(path) for path in written))
