"""`flotilla view`: the plot's bands and the video's timeline show each step's control label."""

import numpy as np
import pytest

from fleet.io.view import LABEL_COLORS, MIN_VIDEO_SIDE
from fleet.labels import ControlLabel
from tests.io_data import make_store
from tests.test_cli import flotilla

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with make_store(tmp_path_factory.mktemp("view") / "fleet.zarr", episodes=3) as store:
        yield store


def band_pixels(png, label: ControlLabel) -> int:
    """Pixels of the plot in the label's band colour (alpha 0.25 over white)."""
    image = cv2.imread(str(png))[..., ::-1].astype(int)
    band = 255 * 0.75 + np.array(LABEL_COLORS[label]) * 0.25
    return int(np.sum(np.all(np.abs(image - band) <= 2, axis=-1)))


def test_view_colours_who_was_in_control(store, tmp_path):
    out = flotilla("view", str(store.path), "episode=2", f"out={tmp_path / 'ep2'}").stdout
    assert "ep2.png" in out and "ep2.mp4" in out
    labels = store.episode(2, ["label"])["label"]
    # Bands are tens of thousands of pixels; a few hundred grey ones in ep2 are anti-aliased lines.
    ep2 = {label: band_pixels(tmp_path / "ep2.png", label) for label in ControlLabel}
    assert (
        min(ep2[ControlLabel.ROBOT], ep2[ControlLabel.PRE_INTERVENTION], ep2[ControlLabel.INTERVENTION])
        > 50_000
    )
    assert ep2[ControlLabel.DEMO] < 5_000
    flotilla("view", str(store.path), "episode=0", f"out={tmp_path / 'ep0'}")  # all demo
    assert band_pixels(tmp_path / "ep0.png", ControlLabel.INTERVENTION) < 5_000
    assert band_pixels(tmp_path / "ep0.png", ControlLabel.DEMO) > 50_000

    with av.open(str(tmp_path / "ep2.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == len(labels)
    scale = MIN_VIDEO_SIDE // 32
    for t, frame in enumerate(frames):
        assert frame.shape[1] >= MIN_VIDEO_SIDE
        # The bar under the camera image has the step's label colour (right of the text).
        current = frame[32 * scale + 4 : 32 * scale + 8, -40:-10].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(current, LABEL_COLORS[ControlLabel(int(labels[t]))], atol=25)


def test_view_errors_are_one_line(store, tmp_path):
    result = flotilla("view", str(store.path), "episode=7", check=False)
    assert result.returncode == 2 and "out of range" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = flotilla("view", str(store.path), "keys=[nope]", check=False)
    assert result.returncode == 2 and "nope" in result.stderr


def line_pixels(png, rgb) -> int:
    image = cv2.imread(str(png))[..., ::-1].astype(int)
    return int(np.sum(np.all(np.abs(image - np.array(rgb)) <= 3, axis=-1)))


def test_view_of_a_one_step_episode_and_of_a_store_without_cameras(tmp_path):
    # One step and no recorded control rate: nothing to read a frame rate from; the video still plays.
    with make_store(tmp_path / "one.zarr", episodes=1, length=1, control_hz=None) as store:
        flotilla("view", str(store.path), f"out={tmp_path / 'one'}")
    with av.open(str(tmp_path / "one.mp4")) as container:
        assert len(list(container.decode(video=0))) == 1
    # Its one value per key is drawn as a point (a one-point line draws nothing): the first line's colour.
    assert line_pixels(tmp_path / "one.png", (31, 119, 180)) > 20
    with make_store(tmp_path / "lowdim.zarr", episodes=2, cameras=()) as store:
        out = flotilla("view", str(store.path), "episode=1", f"out={tmp_path / 'lowdim'}").stdout
    assert "lowdim.png" in out and not (tmp_path / "lowdim.mp4").exists()
    assert band_pixels(tmp_path / "lowdim.png", ControlLabel.INTERVENTION) > 50_000
