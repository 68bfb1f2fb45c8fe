"""Sample weights, memory strategies and training windows over real episode stores."""

import numpy as np
import pytest

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore
from policies.data.memory import EpisodeRecord, select_episodes
from policies.data.weighting import sample_weights, takeover_holds
from policies.data.windows import WindowDataset, load_episodes, split_episodes

D, R, P, I = (ControlLabel.DEMO, ControlLabel.ROBOT, ControlLabel.PRE_INTERVENTION, ControlLabel.INTERVENTION)  # noqa: E741 (the four labels, by initial)


def mass_share(weights, labels, label):
    return weights[labels == label].sum() / weights.sum()


def test_sirius_rule_on_a_synthetic_label_mix():
    labels = np.array([D] * 200 + [R] * 600 + [P] * 60 + [I] * 140)
    weights = sample_weights(labels, "sirius")
    assert weights.mean() == pytest.approx(1.0)
    assert mass_share(weights, labels, I) == pytest.approx(0.5)
    assert mass_share(weights, labels, P) == pytest.approx(0.002)
    # Demo and robot steps share the remaining 49.8% by count (200 : 600).
    assert mass_share(weights, labels, D) == pytest.approx(0.498 * 200 / 800)
    assert mass_share(weights, labels, R) == pytest.approx(0.498 * 600 / 800)
    assert weights[labels == D][0] == pytest.approx(weights[labels == R][0])
    # Within a label every step weighs the same; interventions far outweigh robot steps.
    assert np.ptp(weights[labels == I]) == 0 and weights[labels == I][0] > 5 * weights[labels == R][0]


def test_sirius_keeps_its_mass_targets_when_demos_dominate():
    labels = np.array([D] * 900 + [R] * 50 + [I] * 50)
    weights = sample_weights(labels, "sirius")
    assert mass_share(weights, labels, I) == pytest.approx(0.5) and weights[labels == R].min() > 0
    np.testing.assert_allclose(sample_weights(np.array([D] * 10), "sirius"), 1.0)  # demos only: plain BC


def test_other_schemes():
    labels = np.array([D] * 10 + [R] * 70 + [P] * 5 + [I] * 15)
    np.testing.assert_allclose(sample_weights(labels, "uniform"), 1.0)
    hg = sample_weights(labels, "hg_dagger")
    assert np.all(hg[(labels == R) | (labels == P)] == 0) and np.all(hg[(labels == D) | (labels == I)] > 0)
    iwr = sample_weights(labels, "iwr")
    assert mass_share(iwr, labels, I) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown weighting scheme 'sirus'"):
        sample_weights(labels, "sirus")
    with pytest.raises(ValueError, match="weight 0"):
        sample_weights(np.array([R] * 5), "hg_dagger")


def test_memory_strategies_under_a_budget():
    records = [
        EpisodeRecord(order=0, length=100, interventions=0, is_demo=True),
        EpisodeRecord(order=1, length=100, interventions=40, is_demo=False),
        EpisodeRecord(order=2, length=100, interventions=5, is_demo=False),
        EpisodeRecord(order=3, length=100, interventions=20, is_demo=False),
    ]
    assert select_episodes(records, "keep_all", 150) == [0, 1, 2, 3]
    assert select_episodes(records, "fifo", 200) == [0, 2, 3]  # demo pinned + the two newest
    assert select_episodes(records, "lfi", 200) == [0, 1, 3]  # keeps the most intervened
    assert select_episodes(records, "mfi", 200) == [0, 2, 3]  # keeps the least intervened
    assert select_episodes(records, "fifo", 250, keep_demos=False) == [2, 3]
    with pytest.raises(ValueError, match="unknown memory strategy"):
        select_episodes(records, "lifo", 100)


def write_store(path, episodes):
    """episodes: list of label lists; step t of episode e has state = 100 * e + t."""
    with EpisodeStore.create(path) as store:
        for e, labels in enumerate(episodes):
            episode = store.begin_episode("r0", "push")
            for t, label in enumerate(labels):
                value = 100.0 * e + t
                episode.append(
                    {"state": np.array([value, -value], np.float32), "goal": np.array([e], np.float32)},
                    np.full(2, value, np.float32),
                    label,
                )
            episode.commit(success=True)


def test_windows_follow_the_diffusion_policy_convention(tmp_path):
    write_store(tmp_path / "a.zarr", [[D] * 5, [R] * 3 + [I] * 4])
    data = load_episodes([str(tmp_path / "a.zarr")], ["state"])
    dataset = WindowDataset(data, np.array([0, 1]), ["state"], n_obs_steps=2, horizon=4, weighting="sirius")
    assert len(dataset) == 12
    first = dataset[0]  # anchored at step 0 of episode 0: history padded with step 0
    np.testing.assert_array_equal(first["obs"]["state"][:, 0], [0, 0])
    np.testing.assert_array_equal(first["action"][:, 0], [0, 0, 1, 2])
    last = dataset[4]  # anchored at the last step of episode 0: actions padded with the last step
    np.testing.assert_array_equal(last["obs"]["state"][:, 0], [3, 4])
    np.testing.assert_array_equal(last["action"][:, 0], [3, 4, 4, 4])
    assert float(dataset[6]["goal"][0]) == 1.0
    intervention_weight = float(dataset[10]["weight"])
    robot_weight = float(dataset[6]["weight"])
    assert intervention_weight > robot_weight


def test_loading_several_stores_with_a_budget_and_a_split(tmp_path):
    write_store(tmp_path / "a.zarr", [[D] * 10])
    write_store(tmp_path / "b.zarr", [[R] * 10, [R] * 5 + [I] * 5, [R] * 10])
    data = load_episodes(
        [str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")], ["state"], "lfi", budget_steps=10
    )
    # The demo is pinned; of the round's episodes only the intervened one fits the budget.
    assert data.num_episodes == 2 and data.summary()["labels"] == {"demo": 10, "robot": 5, "intervention": 5}
    train, val = split_episodes(10, 0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and len(train) + len(val) == 10
    with pytest.raises(ValueError, match="no step key"):
        load_episodes([str(tmp_path / "a.zarr")], ["front_rgb"])


def test_padding_past_an_episode_edge_is_masked_out_of_the_loss(tmp_path):
    write_store(tmp_path / "a.zarr", [[D] * 5])
    data = load_episodes([str(tmp_path / "a.zarr")], ["state"])
    dataset = WindowDataset(data, np.array([0]), ["state"], n_obs_steps=2, horizon=4)
    np.testing.assert_array_equal(dataset[0]["action_mask"], [0, 1, 1, 1])  # step -1 never happened
    np.testing.assert_array_equal(dataset[2]["action_mask"], [1, 1, 1, 1])
    np.testing.assert_array_equal(dataset[4]["action_mask"], [1, 1, 0, 0])  # steps 5, 6 never happened


def test_chunk_loss_ignores_masked_steps():
    import torch

    from policies.models.encoders import chunk_loss

    error = torch.ones(2, 4, 3)
    error[:, 2:] = 100.0  # huge error only on padded steps
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    loss = chunk_loss(error, {"action_mask": mask})
    assert loss[0].item() == 1.0 and loss[1].item() > 40
    assert torch.equal(chunk_loss(error, {}), error.mean(dim=(1, 2)))


def test_takeover_holds_are_the_zero_motion_steps_opening_a_takeover():
    labels = np.array([R, R, I, I, I, I, R, I] + [I, I, R])
    moves = np.array([1, 1, 0, 0, 1, 0, 1, 1] + [0, 1, 1], bool)  # ep 1 starts with the takeover held over
    actions = np.zeros((len(labels), 4), np.float32)
    actions[moves, :3] = 0.5
    actions[:, 3] = 1.0  # the gripper is kept during a hold: it does not count as motion
    holds = takeover_holds(labels, actions, episode_ends=np.array([8, 11]))
    # The two steps before the operator's first action, and the takeover carried into episode 1;
    # not the stop in mid-takeover (step 5: the human chose to), nor anything the robot did.
    np.testing.assert_array_equal(np.flatnonzero(holds), [2, 3, 8])
    assert not takeover_holds(labels, actions, gripper_index=None)[2:4].any()  # the gripper moved "motion"


def test_training_windows_leave_out_takeover_holds(tmp_path):
    labels, moves = [R, R, R, I, I, I, I, I, R, R], [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    with EpisodeStore.create(tmp_path / "a.zarr") as store:
        episode = store.begin_episode("r0", "reach")
        for t, (label, moving) in enumerate(zip(labels, moves, strict=True)):
            episode.append(
                {"state": np.array([t], np.float32)}, np.array([0.5 * moving, 1.0], np.float32), label
            )
        episode.commit(success=True)
    data = load_episodes([str(tmp_path / "a.zarr")], ["state"])
    assert data.summary()["takeover_holds"] == 2
    dataset = WindowDataset(data, np.array([0]), ["state"], n_obs_steps=2, horizon=4, weighting="sirius")
    # No window is anchored at a hold, and every window masks the hold steps out of its loss.
    np.testing.assert_array_equal(dataset.anchors, [0, 1, 2, 5, 6, 7, 8, 9])
    before = dataset[2]  # anchored at step 2: actions of steps 1..4
    np.testing.assert_array_equal(before["action_mask"], [1, 1, 0, 0])
    first_move = dataset[3]  # anchored at step 5: actions of steps 4..7
    np.testing.assert_array_equal(first_move["action_mask"], [0, 1, 1, 1])
    # Sirius gives the three interventions that moved half the weight.
    assert dataset.weights[dataset.anchors >= 5][:3].sum() / dataset.weights.sum() == pytest.approx(0.5)


def test_steps_of_weight_zero_are_left_out(tmp_path):
    write_store(tmp_path / "a.zarr", [[D] * 5, [R] * 3 + [P] * 2 + [I] * 4])
    data = load_episodes([str(tmp_path / "a.zarr")], ["state"])
    dataset = WindowDataset(
        data, np.array([0, 1]), ["state"], n_obs_steps=2, horizon=4, weighting="hg_dagger"
    )
    # hg_dagger learns from humans only: batches hold demo and intervention windows, nothing weighing 0.
    np.testing.assert_array_equal(dataset.anchors, [0, 1, 2, 3, 4, 10, 11, 12, 13])
    np.testing.assert_allclose(dataset.weights, 1.0)
    # ... and no window imitates a robot step either: the first takeover window (actions of steps 9..12)
    # masks step 9, a pre-intervention step.
    np.testing.assert_array_equal(dataset[5]["action_mask"], [0, 1, 1, 1])
    assert (
        len(WindowDataset(data, np.array([0, 1]), ["state"], n_obs_steps=2, horizon=4, weighting="uniform"))
        == 14
    )
