"""`flotilla view STORE [episode=N]`: one episode to look at, with who was in control coloured.

PREFIX.png: the low-dim keys (action, observations, signals) over the episode's steps, on bands coloured by
control label, so the steps where a human took over stand out. PREFIX.mp4 (when the store has a camera):
the camera's frames, scaled up, above a timeline of the labels with the current step marked and the
current label named.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from fleet.io.common import DataIOError, check_keys, control_rate, image_keys, lowdim_obs_keys, require
from fleet.labels import ControlLabel
from fleet.store.episode_store import SIGNAL_PREFIX, EpisodeStore

# RGB per control label: demos grey, the robot blue, the steps before a takeover amber, humans red.
LABEL_COLORS = {
    ControlLabel.DEMO: (150, 150, 150),
    ControlLabel.ROBOT: (60, 110, 220),
    ControlLabel.PRE_INTERVENTION: (240, 170, 30),
    ControlLabel.INTERVENTION: (220, 40, 40),
}
MIN_VIDEO_SIDE = 256  # frames are scaled up (nearest) to at least this many pixels wide
TIMELINE_PX = 24
MAX_PLOTS = 8
DEFAULT_FPS = 10  # the video's frame rate when the store does not tell its control rate


def write_view(
    store: EpisodeStore,
    episode: int,
    out: str | None = None,
    keys: list[str] | None = None,
    camera: str | None = None,
    fps: int | None = None,
) -> list[Path]:
    """Write PREFIX.png (and PREFIX.mp4 with a camera) for `episode`; returns the paths written."""
    schema = store.schema or {}
    meta = store.episode_meta(episode)  # IndexError names the range
    prefix = Path(out) if out else store.path.with_name(f"{store.path.stem}_episode{meta.index}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if keys is None:
        keys = ["action", *lowdim_obs_keys(schema), *sorted(k for k in schema if k.startswith(SIGNAL_PREFIX))]
        keys = keys[:MAX_PLOTS]
    check_keys(keys, schema, "keys")
    cameras = image_keys(schema)
    if camera is not None:
        key = camera if camera in schema else camera + "_rgb"
        check_keys([key], schema, "camera")
        cameras = [key]
    steps = store.episode(meta.index, [*keys, "label", *cameras[:1]])
    labels = steps["label"]
    title = f"{store.path.name} episode {meta.index}: {meta.task}, {meta.robot_id}, {meta.outcome}"
    written = [_plot(prefix.with_suffix(".png"), steps, keys, labels, title)]
    if cameras:
        try:
            rate = control_rate(store, fps)[0]
        except DataIOError:  # no control_hz and no step spacing to read (e.g. one-step episodes)
            rate = DEFAULT_FPS
        written.append(_video(prefix.with_suffix(".mp4"), steps[cameras[0]], labels, rate))
    return written


def _label_spans(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, end, label) runs of equal labels."""
    edges = np.flatnonzero(np.diff(labels.astype(np.int16))) + 1
    starts, ends = np.r_[0, edges], np.r_[edges, len(labels)]
    return [(int(s), int(e), int(labels[s])) for s, e in zip(starts, ends, strict=True)]


def _plot(path: Path, steps: dict, keys: list[str], labels: np.ndarray, title: str) -> Path:
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Patch

    figure, axes = pyplot.subplots(
        len(keys), 1, figsize=(10, 1.8 * len(keys) + 0.8), sharex=True, squeeze=False
    )
    for axis, key in zip(axes[:, 0], keys, strict=True):
        values = np.asarray(steps[key], dtype=np.float64).reshape(len(labels), -1)
        for start, end, label in _label_spans(labels):
            color = np.array(LABEL_COLORS[ControlLabel(label)]) / 255
            axis.axvspan(start - 0.5, end - 0.5, color=color, alpha=0.25, lw=0)
        axis.plot(values, lw=1, marker="o" if len(labels) == 1 else None)  # one step: a line is invisible
        axis.set_ylabel(key, rotation=0, ha="right", va="center")
    axes[-1, 0].set_xlabel("step")
    present = sorted({int(code) for code in labels})
    legend = [
        Patch(
            color=np.array(LABEL_COLORS[ControlLabel(c)]) / 255, alpha=0.5, label=ControlLabel(c).label_name
        )
        for c in present
    ]
    figure.legend(handles=legend, loc="upper right", ncol=len(legend))
    figure.suptitle(title, x=0.01, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path


def _video(path: Path, frames: np.ndarray, labels: np.ndarray, fps: int) -> Path:
    av = require("av")
    import cv2  # base install

    height, width = frames.shape[1:3]
    scale = max(1, -(-MIN_VIDEO_SIDE // width))
    out_h, out_w = height * scale + TIMELINE_PX, width * scale
    out_h, out_w = out_h + out_h % 2, out_w + out_w % 2  # yuv420p needs even sizes
    timeline = np.zeros((TIMELINE_PX // 2, out_w, 3), np.uint8)
    columns = np.minimum((np.arange(out_w) * len(labels)) // out_w, len(labels) - 1)
    timeline[:] = np.array([LABEL_COLORS[ControlLabel(int(labels[c]))] for c in columns], np.uint8)[None]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "20"})
        stream.height, stream.width, stream.pix_fmt = out_h, out_w, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for t, image in enumerate(frames):
            canvas = np.zeros((out_h, out_w, 3), np.uint8)
            canvas[: height * scale, : width * scale] = np.repeat(np.repeat(image, scale, 0), scale, 1)
            bar = canvas[height * scale : height * scale + TIMELINE_PX]
            bar[TIMELINE_PX // 2 :] = timeline
            bar[: TIMELINE_PX // 2] = LABEL_COLORS[ControlLabel(int(labels[t]))]
            x = int(t * out_w / len(labels))
            bar[TIMELINE_PX // 2 :, x : x + 2] = 255
            name = f"{t} {ControlLabel(int(labels[t])).label_name}"
            cv2.putText(
                bar, name, (4, TIMELINE_PX // 2 - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1
            )
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
