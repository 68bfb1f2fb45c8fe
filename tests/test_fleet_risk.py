"""The learned risk in the fleet loop (issue 14, section 4): a policy whose checkpoint carries safety models
(fitted as `flotilla demo` and benchmarks.fleet fit them, sim/round_safety.py) makes its robots report a
non-zero learned risk over real gRPC, C.U.R. ranks them by it, and Flotilla's rule ranks by the signal
its config names."""

import dataclasses

import numpy as np
import pytest

from fleet.allocation import RISK, UNCERTAINTY, RobotSlot, Signals, make_allocator
from fleet.client import publish_checkpoint
from fleet.server import AllocationConfig, ServerThread
from fleet.store import EpisodeStore
from policies.fleet_policies import RegistryPolicies
from policies.safety.config import SafetyConfig
from policies.safety.models import load_safety
from sim.collect import collect_demos
from sim.round_safety import RoundSafetyConfig, fit_round_safety, pilot_store, record_pilot
from sim.round_thresholds import fit_round_thresholds
from tests.fleet_harness import TOKEN
from tests.test_fleet_loop import drive, make_fleet, server_config, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_SAFETY = RoundSafetyConfig(pilot_episodes=3, model=SafetyConfig(hidden=16, flow_steps=20, risk_steps=50))


def test_a_safety_carrying_policy_reports_learned_risk_and_cur_ranks_by_it(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "checkpoints", "tiny-safe", seed=3)
    demos = tmp_path / "demos.zarr"
    with EpisodeStore.create(demos) as store:
        collect_demos(store, "reach", 2, seed=0, env_kwargs={"max_steps": 30}, progress=False)
    pilot = record_pilot(TINY_SAFETY, checkpoint, demos, "reach", 0, 4, {"max_steps": 30})
    assert pilot == pilot_store(demos) and EpisodeStore.open(pilot).num_episodes == 3
    fitted = fit_round_safety(TINY_SAFETY, checkpoint, demos, [pilot, tmp_path / "no_fleet_yet.zarr"])
    assert fitted["train_episodes"] >= 1 and load_safety(checkpoint).risk is not None

    # C.U.R. whose uncertainty never asks and whose risk always does: the queue is the risk ranking.
    allocation = AllocationConfig(
        rule="cur", tick_hz=1e-6, t_T=4, t_R=4, uncertainty_threshold=1e9, risk_threshold=0.0
    )
    config = dataclasses.replace(server_config(tmp_path), allocation=allocation)
    server = ServerThread(config).start()
    fleet = None
    try:
        publish_checkpoint(server.address, TOKEN["trainer"], checkpoint, "tiny-safe")
        loader = RegistryPolicies(server.address, TOKEN["robot"], tmp_path / "cache", num_samples=4)
        # No operators: nobody leaves the line, so the queue is the whole ranking.
        fleet = make_fleet(server, 3, 0, lambda robot_id: loader("tiny-safe"), load_policy=loader)

        def ranked():
            """One more allocation tick, and the risks it ranked on (on the server's loop: no step lands
            between the two)."""
            fleet_state = server.server.fleet
            fleet_state.tick()
            risks = {rid: robot.alloc.signals.risk for rid, robot in fleet_state.robots.items()}
            return risks, fleet_state.allocator.queue()

        seen = []

        def queue_of_three():
            risks, queue = server.call(ranked)
            seen.append((risks, queue))
            return len(queue) == 3 and all(risk > 0 for risk in risks.values())

        drive(fleet, queue_of_three, what="three robots in line by their learned risk")
    finally:
        if fleet is not None:
            fleet.close()
        server.stop()
    risks, queue = seen[-1]
    assert all(entry.reason == RISK and entry.assigned_to is None for entry in queue)
    # Each robot's place is its reported risk (the agent's Signals, over gRPC), highest first.
    assert [entry.score for entry in queue] == pytest.approx([risks[entry.robot_id] for entry in queue])
    assert [entry.score for entry in queue] == sorted((entry.score for entry in queue), reverse=True)
    assert len({round(entry.score, 9) for entry in queue}) > 1  # the risk model tells robots apart


@pytest.mark.parametrize(
    ("signal", "first", "reason"),
    [("risk", "risky", RISK), ("uncertainty", "unsure", UNCERTAINTY), ("combined", "both", UNCERTAINTY)],
)
def test_flotilla_ranks_by_the_signal_its_config_names(signal, first, reason):
    allocator = make_allocator(
        "flotilla", flotilla={"signal": signal}, uncertainty_threshold=0.5, risk_threshold=0.5
    )
    robots = {
        "risky": RobotSlot("risky", Signals(uncertainty=0.1, risk=0.95)),
        "unsure": RobotSlot("unsure", Signals(uncertainty=0.95, risk=0.1)),
        "both": RobotSlot("both", Signals(uncertainty=0.8, risk=0.8)),
        "calm": RobotSlot("calm", Signals(uncertainty=0.1, risk=0.1)),
    }
    allocator.tick(robots.values(), [])
    queue = allocator.queue()
    assert queue[0].robot_id == first and queue[0].reason == reason
    in_line = {entry.robot_id for entry in queue}
    # A signal the rule does not rank by does not make a robot ask.
    expected = {"risk": {"risky", "both"}, "uncertainty": {"unsure", "both"}}.get(signal)
    assert in_line == (expected or {"risky", "unsure", "both"})


def test_flotilla_signal_is_checked():
    with pytest.raises(
        ValueError, match="allocation.flotilla.signal must be one of combined, risk, uncertainty"
    ):
        make_allocator("flotilla", flotilla={"signal": "agree"})


def test_round_thresholds_fix_risk_only_when_every_rollout_reports_it():
    rng = np.random.default_rng(0)
    calibration = [
        (
            i % 2 == 0,
            {"uncertainty": rng.uniform(0, 0.3, 20), "risk": rng.uniform(0, 0.1 + 0.8 * (i % 2), 20)},
        )
        for i in range(40)
    ]
    fixed = fit_round_thresholds(calibration, target_false_alarm=0.1)
    assert fixed.nominal_episodes == 20 and fixed.risk is not None and fixed.risk <= 0.1
    without = fit_round_thresholds([(s, {"uncertainty": v["uncertainty"]}) for s, v in calibration], 0.1)
    assert without.risk is None and without.uncertainty == pytest.approx(fixed.uncertainty)
