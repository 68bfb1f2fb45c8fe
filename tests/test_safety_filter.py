"""The safety filter in the policy runner, safety models in checkpoints, and their signals in the fleet.

A tiny format-1 diffusion checkpoint (tests/fixtures/checkpoints_v1/diffusion, reach) gets safety
models with fixed random weights: what is tested is the filter's rule, the checkpoint I/O and the
plumbing to the fleet, not how well the models were trained (tests/test_safety_ldm.py, benchmarks).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet.agent import POLICY, RobotAgent, observation_spec
from fleet.client import RobotClient
from fleet.server import ServerThread
from fleet.store import EpisodeStore
from policies.checkpoint import CheckpointError
from policies.runner import PolicyRunner
from policies.safety.calibration import ConformalThreshold
from policies.safety.filter import HOLD, PASS, SWITCHED, FilterConfig
from policies.safety.models import SAFETY_JSON, SafetyConfig, SafetySuite, build_modules, load_safety
from tests.fleet_harness import TOKEN
from tests.test_fleet_loop import server_config

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1" / "diffusion"
STATE_DIM, ACTION_STEPS, ACTION_DIM = 2 * 3 + 3, 4, 4  # To=2 steps of ee_pos + the goal; 4 actions of 4
K = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def safe_checkpoint(tmp_path) -> Path:
    """The v1 diffusion checkpoint plus safety models (fixed random weights) and calibrated thresholds."""
    path = tmp_path / "diffusion"
    shutil.copytree(V1, path)
    torch.manual_seed(0)
    cfg = SafetyConfig(action_steps=ACTION_STEPS, hidden=16, flow_transforms=2)
    models = build_modules(cfg, STATE_DIM, ACTION_STEPS * ACTION_DIM, ["flow", "rnd", "risk", "ldm"])
    suite = SafetySuite(cfg, STATE_DIM, ACTION_STEPS * ACTION_DIM, violation_energy=3.0, **models)
    rng = np.random.default_rng(0)
    suite.thresholds["ldm"] = ConformalThreshold.fit([rng.normal(size=30) for _ in range(40)], 0.05)
    suite.filter_thresholds = {"ldm": 0.0, "novelty": 50.0}
    suite.nominal = {"ldm": (0.0, 2.0), "risk": (0.5, 0.1)}  # the scale "agree" combines them on
    suite.save(path)
    return path


def observations(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    goal = rng.uniform(0.3, 0.5, 3).astype(np.float32)
    for _ in range(count):  # a wide spread of positions, so some states are scored far worse than others
        yield {"ee_pos": rng.uniform(-0.5, 1.5, 3).astype(np.float32), "goal": goal}


def plans_of(runner: PolicyRunner, count: int) -> list[tuple]:
    """(plan, action returned, signals) for every step that made a new plan."""
    out, seen = [], None
    for obs in observations(count):
        action = runner.act(obs)
        if runner.safety.last is not seen:
            seen = runner.safety.last
            out.append((seen, action, dict(runner.signals)))
    return out


def normalized(runner: PolicyRunner, action: np.ndarray) -> torch.Tensor:
    return runner.policy.normalizer.normalize("action", torch.as_tensor(action))


def test_the_filter_never_executes_a_candidate_above_its_threshold(safe_checkpoint):
    scout = PolicyRunner.from_checkpoint(safe_checkpoint, num_samples=K)
    best = [float(plan.scores["ldm"].min()) for plan, _, _ in plans_of(scout, 60)]
    threshold = float(np.median(best))  # about half the plans have no candidate under it
    runner = PolicyRunner.from_checkpoint(
        safe_checkpoint,
        num_samples=K,
        safety_filter=FilterConfig(mode="ldm", threshold=threshold, choose="first"),
    )
    decisions = []
    for plan, action, signals in plans_of(runner, 80):
        g = plan.scores["ldm"]
        decisions.append(signals["filter"])
        if plan.choice is None:
            assert bool((g > threshold).all()) and signals["filter"] == HOLD and signals["risk"] == 1.0
            assert np.array_equal(action[:3], np.zeros(3))  # held: no motion
        else:
            assert float(g[plan.choice]) <= threshold
            assert plan.choice == int(torch.nonzero(g <= threshold)[0])  # the policy's first safe sample
            # What the robot got is the chosen chunk's first action.
            assert torch.allclose(
                normalized(runner, action), plan.candidates[plan.choice][:ACTION_DIM], atol=1e-5
            )
            assert (
                signals["ldm"] == pytest.approx(float(g[plan.choice]))
                and signals["density"] == -signals["ldm"]
            )
            agree = min(signals["ldm"] / 2.0, (signals["risk"] - 0.5) / 0.1)
            assert signals["agree"] == pytest.approx(agree, rel=1e-5)
    assert {HOLD, PASS, SWITCHED} <= set(decisions), decisions


def test_choose_lowest_executes_the_lowest_scoring_candidate_and_density_mode_bounds_novelty(safe_checkpoint):
    runner = PolicyRunner.from_checkpoint(
        safe_checkpoint, num_samples=K, safety_filter=FilterConfig(mode="density", choose="lowest")
    )
    assert runner.safety.threshold == 50.0  # the checkpoint's calibrated bound
    for plan, _, _ in plans_of(runner, 40):
        novelty = plan.scores["novelty"]
        if plan.choice is not None:
            assert plan.choice == int(torch.argmin(novelty)) and float(novelty[plan.choice]) <= 50.0


def test_safety_models_round_trip_through_the_checkpoint(safe_checkpoint):
    suite = load_safety(safe_checkpoint)
    assert sorted(suite.modules()) == ["flow", "ldm", "risk", "rnd"] and suite.violation_energy == 3.0
    state, candidates = torch.randn(3, STATE_DIM), torch.randn(3, K, ACTION_STEPS * ACTION_DIM)
    scores = suite.score(state, candidates)
    assert {name: s.shape for name, s in scores.items()} == dict.fromkeys(
        ("novelty", "rnd", "risk", "ldm"), (3, K)
    )
    again = load_safety(safe_checkpoint)
    for name, values in again.score(state, candidates).items():
        assert torch.equal(values, scores[name])
    (safe_checkpoint / SAFETY_JSON).write_text('{"format": 1, "config": {}}')
    with pytest.raises(CheckpointError, match="safety"):
        load_safety(safe_checkpoint)


def test_an_old_checkpoint_without_safety_models_still_runs():
    runner = PolicyRunner.from_checkpoint(V1, num_samples=4)
    assert runner.safety is None
    for obs in observations(6):
        assert runner.act(obs).shape == (ACTION_DIM,)
    assert runner.signals == {}
    with pytest.raises(ValueError, match="no safety models"):
        PolicyRunner.from_checkpoint(V1, num_samples=4, safety_filter=FilterConfig(mode="ldm"))


def test_a_checkpoint_with_safety_models_runs_in_the_agent_and_its_signals_reach_the_store(
    safe_checkpoint, tmp_path
):
    config = server_config(tmp_path)
    server = ServerThread(config).start()
    runner = PolicyRunner.from_checkpoint(
        safe_checkpoint, num_samples=K, safety_filter=FilterConfig(mode="ldm")
    )
    obs_stream = list(observations(40))
    spec = observation_spec({"ee_pos": obs_stream[0]["ee_pos"]})
    client = RobotClient(
        f"127.0.0.1:{server.port}", TOKEN["robot"], "safe-1", "reach", spec, action_dim=4, backoff=(0.05, 0.2)
    )
    agent = RobotAgent(client, runner, gripper_index=3).start()
    try:
        agent.begin_episode(obs_stream[0]["goal"])
        reported, deadline = [], time.monotonic() + 20
        for obs in obs_stream:
            while agent.step({"ee_pos": obs["ee_pos"]}).control != POLICY:
                assert time.monotonic() < deadline, "the robot never became autonomous"
                server.call(server.server.fleet.tick)
                reported.append(None)
            reported.append(dict(runner.signals))
        agent.end_episode(False, "failure")
        assert client.wait_acked(timeout=10)
        while server.server.writer.stats.episodes_committed < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Every safety signal of each plan, and the filter's decision, is logged with the step it drove.
        names = ("risk", "density", "novelty", "rnd", "ldm", "agree")
        episode = EpisodeStore.open(config.store).episode(
            0, keys=[f"signal_{name}" for name in (*names, "safety_filter")]
        )
        decision_codes = {"pass": 2, "switched": 3, "hold": 4}
        for t, sent in enumerate(reported):
            if sent is None:
                continue
            got = {name: float(episode[f"signal_{name}"][t]) for name in names}
            assert got == pytest.approx({name: sent[name] for name in names}, rel=1e-5, abs=1e-5)
            assert episode["signal_safety_filter"][t] == decision_codes[sent["filter"]]
        held = episode["signal_safety_filter"] == decision_codes["hold"]
        assert held.any() and (episode["signal_risk"][held] == 1.0).all()  # a hold raises risk to 1
    finally:
        agent.close(timeout=2)
        server.stop()


def test_batched_runners_report_the_safety_signals_too(safe_checkpoint):
    # The GPU fleet's robots plan through one BatchedPlanner; their runners score their own candidates.
    from policies.batched import BatchedPlanner
    from policies.checkpoint import load_checkpoint

    checkpoint, suite = load_checkpoint(safe_checkpoint), load_safety(safe_checkpoint)
    planner = BatchedPlanner()
    runners = [
        planner.runner(
            checkpoint.policy, "v", num_samples=K, action_space=checkpoint.action_space, safety=suite
        )
        for _ in range(2)
    ]
    first = next(observations(1))
    for runner in runners:  # outside a tick each plans alone, still through the planner
        assert runner.act(first).shape == (4,)
        assert {"risk", "novelty", "ldm", "agree"} <= set(runner.signals)
        assert runner.signals["filter"] == "off"  # scored, not filtered: no filter was asked for
    assert planner.batch_sizes == [1, 1]
