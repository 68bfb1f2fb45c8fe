"""The fleet learning loop end to end: a real fleet server on a 127.0.0.1 port, real pybullet robots driven
by the RobotAgent, scripted operators over gRPC, a real zarr store and registry, and `flotilla demo`.

The allocator is ticked in lockstep with the robots (sim.fleet_sim.lockstep_tick), so t_T and t_R are
exact in robot steps however busy the machine is.
"""

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet.agent import HOLD_OFFLINE, HOLD_SERVER, OPERATOR, POLICY, RobotAgent, observation_spec
from fleet.client import OperatorClient, RobotClient, fleet_status, publish_checkpoint
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb
from fleet.server import AllocationConfig, ServerConfig, ServerThread
from fleet.store import EpisodeStore
from policies.checkpoint import save_checkpoint
from policies.fleet_policies import RegistryPolicies
from policies.models.factory import ShapeMeta, build_policy
from sim.fleet_sim import SimFleet, lockstep_tick
from tests.fleet_harness import TOKEN, TOKENS

T_T, T_R, PRE = 6, 4, 3
HZ = 20
ROBOT, PRE_INTERVENTION, INTERVENTION = (
    int(ControlLabel.ROBOT),
    int(ControlLabel.PRE_INTERVENTION),
    int(ControlLabel.INTERVENTION),
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def server_config(tmp_path, port: int = 0) -> ServerConfig:
    """C.U.R. with a fixed uncertainty threshold; the timer never ticks: the fleet does (lockstep)."""
    return ServerConfig(
        port=port,
        metrics_port=None,
        tokens=TOKENS,
        store=str(tmp_path / "fleet.zarr"),
        registry_dir=str(tmp_path / "registry"),
        pre_intervention_steps=PRE,
        frame_hz=1000,
        shutdown_grace_s=0.5,
        allocation=AllocationConfig(
            rule="cur", tick_hz=1e-6, t_T=T_T, t_R=T_R, uncertainty_threshold=0.35, risk_threshold=1.0
        ),
    )


def start_server(tmp_path) -> ServerThread:
    return ServerThread(server_config(tmp_path)).start()


def tiny_checkpoint(folder: Path, version: str, seed: int) -> Path:
    """An untrained tiny diffusion policy for reach (its samples disagree: high uncertainty)."""
    torch.manual_seed(seed)
    meta = ShapeMeta(obs={"ee_pos": (3,)}, action_dim=4, goal_dim=3)
    policy = build_policy(
        "diffusion",
        meta,
        n_obs_steps=2,
        horizon=8,
        n_action_steps=4,
        down_dims=[8, 16],
        num_inference_steps=3,
    )
    rng = np.random.default_rng(seed)
    policy.normalizer.fit(
        {
            "ee_pos": rng.uniform(0.2, 0.6, (64, 3)).astype(np.float32),
            "goal": rng.uniform(0.2, 0.6, (64, 3)).astype(np.float32),
            "action": rng.uniform(-1, 1, (64, 4)).astype(np.float32),
        }
    )
    return save_checkpoint(folder / version, policy, meta, version)


class ScriptedPolicy:
    """A torch-free policy for the agent: a fixed action and a fixed uncertainty."""

    def __init__(self, action, uncertainty: float, version: str):
        self.action, self.uncertainty, self.version = np.asarray(action, np.float32), uncertainty, version

    def reset(self) -> None:
        pass

    def act(self, obs, goal=None):
        return self.action.copy()


DIVE = ScriptedPolicy([0.0, 0.0, -1.0, -1.0], 0.0, "dive")  # straight into the table: a constraint violation


def make_fleet(server, n_robots, n_operators, policy, **kwargs) -> SimFleet:
    fleet = SimFleet(
        server.address,
        TOKEN,
        "reach",
        n_robots,
        n_operators,
        policy=policy,
        control_hz=HZ,
        env_kwargs={"max_steps": 30},
        expert_kwargs={"reaction_delay": 1},
        operator_extra_steps=2,
        record_steps=True,
        backoff=(0.05, 0.2),
        server_tick=lockstep_tick(server),
        **kwargs,
    ).start()
    assert fleet.wait_connected(30)
    return fleet


def drive(fleet: SimFleet, until, timeout: float = 30.0, what: str = "condition") -> None:
    """Step the fleet at HZ until `until()` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        fleet.step()
        time.sleep(1.0 / HZ)


def takeovers(steps, robot_id):
    """Runs of consecutive INTERVENTION steps of one robot under one operator, across episodes:
    [(operator, length, ended_while_stepping)]. A run is cut short when the robot stops stepping (it finished
    its episodes and idles): t_T then runs out unwatched, so such runs have ended_while_stepping False."""
    mine = [s for s in steps if s.robot_id == robot_id]
    ticks = {s.tick for s in mine}
    runs = []  # [operator, length, last tick]
    for previous, step in zip([None, *mine], mine, strict=False):
        if step.label != INTERVENTION:
            continue
        if (
            previous is not None
            and previous.label == INTERVENTION
            and previous.operator_id == step.operator_id
            and step.tick == previous.tick + 1
        ):
            runs[-1][1:] = [runs[-1][1] + 1, step.tick]
        else:
            runs.append([step.operator_id, 1, step.tick])
    return [(operator, length, last + 1 in ticks) for operator, length, last in runs]


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    """4 robots (one diving into the table, three on an untrained tiny policy from the registry), 2 operators;
    2 episodes each, then a new version is published and every robot runs 1 more episode on it."""
    tmp = tmp_path_factory.mktemp("fleet")
    server = start_server(tmp)
    for version, seed in (("tiny-v1", 1), ("tiny-v2", 2)):
        tiny_checkpoint(tmp / "checkpoints", version, seed)
    publish_checkpoint(server.address, TOKEN["trainer"], tmp / "checkpoints" / "tiny-v1", "tiny-v1")

    loader = RegistryPolicies(server.address, TOKEN["robot"], tmp / "cache", num_samples=4)

    def policy(robot_id):
        return DIVE if robot_id == "sim-robot-0" else loader("tiny-v1")

    fleet = None
    try:
        fleet = make_fleet(server, 4, 2, policy, load_policy=loader)
        first = fleet.run_round(2, max_steps=600)
        publish_checkpoint(server.address, TOKEN["trainer"], tmp / "checkpoints" / "tiny-v2", "tiny-v2")
        assert fleet.wait_for_policy("tiny-v2", timeout=60)
        second = fleet.run_round(1, max_steps=600)
        assert fleet.flush(30)
        status = fleet_status(server.address, TOKEN["admin"])
    finally:
        if fleet is not None:
            fleet.close()
        server.stop()
    yield {
        "store": EpisodeStore.open(tmp / "fleet.zarr"),
        "steps": fleet.steps,
        "operators": fleet.operators,
        "rounds": (first, second),
        "status": status,
    }


def test_interventions_respect_t_T_and_only_the_assigned_operator_moves_a_robot(fleet_run):
    steps, operators = fleet_run["steps"], fleet_run["operators"]
    first, _ = fleet_run["rounds"]
    assert first.interventions > 0 and first.intervention_steps > 0
    sent = {
        (robot, op.operator_id, tuple(np.round(action, 5)))
        for op in operators
        for robot, _, action in op.sent
    }
    checked = 0
    for step in steps:
        if step.control == OPERATOR:
            # The applied action is one the robot's assigned operator sent for this very robot.
            assert (step.robot_id, step.operator_id, tuple(np.round(step.action, 5))) in sent
            checked += 1
    assert checked > 0
    finished = 0
    for robot_id in {step.robot_id for step in steps}:
        runs = takeovers(steps, robot_id)
        finished += sum(run[2] for run in runs)
        # Every takeover that ended while the robot was stepping lasted t_T steps (give or take the one step a
        # command takes to arrive at each end).
        short = [run for run in runs if run[2] and run[1] < T_T - 1]
        assert not short, f"{robot_id}: takeovers shorter than t_T={T_T}: {short} (all: {runs})"
    assert finished > 0


def test_blocked_robot_holds_t_R_steps_and_gets_a_human_reset(fleet_run):
    store, (first, _) = fleet_run["store"], fleet_run["rounds"]
    assert first.hard_resets >= 1 and first.constraint_violations >= 1
    resets = [i for i in range(store.num_episodes) if store.episode_meta(i).outcome == "reset"]
    assert resets, "no episode ended with a human reset"
    for index in resets:
        violation = store.episode(index, keys=["signal_constraint_violation"])["signal_constraint_violation"]
        blocked = int(np.sum(violation > 0))
        assert blocked >= T_R, f"episode {index} was reset after {blocked} blocked steps (t_R={T_R})"


def test_episodes_are_logged_with_sirius_labels(fleet_run):
    store, first, second = fleet_run["store"], *fleet_run["rounds"]
    assert store.num_episodes == first.episodes + second.episodes == 12
    labels = store.labels()
    assert {ROBOT, PRE_INTERVENTION, INTERVENTION} <= set(np.unique(labels).tolist())
    assert int(np.sum(labels == INTERVENTION)) == first.intervention_steps + second.intervention_steps
    # pre_intervention marks the PRE robot steps right before a human took over: each run of them is followed
    # by an intervention, or (a takeover to reset a blocked robot) by the hold that ends in the reset.
    for index in range(store.num_episodes):
        episode_labels = store.episode(index, keys=["label"])["label"]
        pre = np.flatnonzero(episode_labels == PRE_INTERVENTION)
        for start, end in zip(
            pre[np.r_[True, np.diff(pre) > 1]], pre[np.r_[np.diff(pre) > 1, True]], strict=True
        ):
            assert end - start + 1 <= PRE
            after = episode_labels[end + 1 : end + 3]
            assert INTERVENTION in after or store.episode_meta(index).outcome == "reset", (
                index,
                episode_labels,
            )


def test_no_episode_begins_under_a_human(fleet_run):
    # A robot whose episode ended under a human waits to be handed back before its next episode, so the
    # human's takeover never spills into (and finishes) an episode the policy should be judged on.
    store = fleet_run["store"]
    first_labels = [int(store.episode(i, keys=["label"])["label"][0]) for i in range(store.num_episodes)]
    assert INTERVENTION not in first_labels
    assert any(INTERVENTION in store.episode(i, keys=["label"])["label"] for i in range(store.num_episodes))


def test_new_policy_is_hot_swapped_between_episodes(fleet_run):
    store, second = fleet_run["store"], fleet_run["rounds"][1]
    assert second.policy_version == "tiny-v2"
    by_robot: dict[str, list[str]] = {}
    for index in range(store.num_episodes):
        meta = store.episode_meta(index)
        by_robot.setdefault(meta.robot_id, []).append(meta.policy_version)
    for robot_id, versions in by_robot.items():
        assert versions[-1] == "tiny-v2", (robot_id, versions)
        assert versions[0] in ("tiny-v1", "dive"), (robot_id, versions)
    # Within an episode the version never changes: every step of it carries the episode's version.
    for step in fleet_run["steps"]:
        assert step.policy_version in ("tiny-v1", "tiny-v2", "dive")
    assert {robot.policy_version for robot in fleet_run["status"].robots} == {"tiny-v2"}


@contextlib.contextmanager
def unsure_robot_taken_over(tmp_path):
    """A fleet of one robot whose policy is unsure (it asks for help) and the operator who took it over."""
    server = start_server(tmp_path)
    fleet = make_fleet(server, 1, 1, lambda robot_id: ScriptedPolicy([0, 0, 0, -1], 0.9, "unsure"))
    operator, robot = fleet.operators[0], fleet.robots[0]
    try:
        drive(fleet, lambda: operator.robot_id == robot.robot_id, what="a takeover")
        yield server, fleet, operator, robot
    finally:
        fleet.close()
        robot.env.close()  # (the fleet closes only the envs of the robots still in it)
        server.stop()


def test_robot_disconnect_mid_intervention_frees_the_operator(tmp_path):
    with unsure_robot_taken_over(tmp_path) as (server, fleet, operator, robot):
        drive(fleet, lambda: any(s.control == OPERATOR for s in fleet.steps), what="a teleop step")
        robot.agent.client.close()
        fleet.robots.remove(robot)
        deadline = time.monotonic() + 10
        while operator.robot_id is not None:
            assert time.monotonic() < deadline, "the operator was never released"
            server.call(server.server.fleet.tick)
            time.sleep(0.05)
        status = fleet_status(server.address, TOKEN["admin"])
        assert not status.robots[0].connected and status.robots[0].operator_id == ""


def test_operator_disconnect_holds_the_robot_and_requeues_it(tmp_path):
    with unsure_robot_taken_over(tmp_path) as (server, fleet, first, robot):
        first.close()
        fleet.operators.remove(first)
        held_from = len(fleet.steps)
        drive(
            fleet,
            lambda: sum(s.control == HOLD_SERVER for s in fleet.steps[held_from:]) >= 3,
            what="the robot to hold",
        )
        # Nobody moves it meanwhile, and it waits at the head of the queue for the next human.
        assert not any(s.control == OPERATOR for s in fleet.steps[held_from + 2 :])
        watcher = OperatorClient(server.address, TOKEN["operator"], "watcher").start()
        try:
            queue = watcher.next_update(5, kind="queue")
            assert queue is not None and queue.queue.entries[0].robot_id == robot.robot_id
            assert queue.queue.entries[0].assigned_to == ""
        finally:
            watcher.close()
        second = fleet.add_operator("sim-operator-late")
        drive(
            fleet,
            lambda: any(
                s.operator_id == "sim-operator-late" and s.control == OPERATOR
                for s in fleet.steps[held_from:]
            ),
            what="the new operator to take over",
        )
        assert second.assignments >= 1
        assert robot.agent.client.state.mode in (pb.MODE_TELEOP, pb.MODE_AUTONOMOUS)


def test_flotilla_fleet_against_an_empty_registry_is_one_line(tmp_path):
    """`flotilla fleet` before any policy is published: the server's answer in one line, not a traceback."""
    server = start_server(tmp_path)
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "flotilla.cli",
                "fleet",
                f"server={server.address}",
                "robots=1",
                "operators=1",
                f"tokens.robot={TOKEN['robot']}",
                f"tokens.operator={TOKEN['operator']}",
                f"cache_dir={tmp_path / 'cache'}",
            ],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        f"flotilla fleet: server: {server.address}: NOT_FOUND: the registry is empty: nothing is published yet"
    )


def test_unreachable_server_makes_the_robot_hold_and_loses_no_step(tmp_path):
    with socket.socket() as probe:  # a free port, with nobody listening on it yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    obs = {"state": np.zeros(3, np.float32)}
    client = RobotClient(
        f"127.0.0.1:{port}",
        TOKEN["robot"],
        "lonely",
        "reach",
        observation_spec(obs),
        action_dim=4,
        backoff=(0.05, 0.2),
    )
    agent = RobotAgent(client, ScriptedPolicy([0.5, 0, 0, 1], 0.0, "v1"), gripper_index=3).start()
    server = None
    try:
        agent.begin_episode()
        offline = [agent.step(obs) for _ in range(5)]
        assert all(tick.control == HOLD_OFFLINE for tick in offline)
        assert all(
            np.array_equal(tick.action, [0, 0, 0, 0]) for tick in offline
        )  # gripper kept (never opened)
        config = server_config(tmp_path, port)  # now serve on the port the robot has been dialling
        server = ServerThread(config).start()
        deadline = time.monotonic() + 20
        while agent.step(obs).control != POLICY:
            assert time.monotonic() < deadline, "the robot never reconnected"
            server.call(server.server.fleet.tick)
            time.sleep(0.02)
        agent.end_episode(True, "success")
        assert client.wait_acked(timeout=10)
        while server.server.writer.stats.episodes_committed < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        episode = EpisodeStore.open(config.store).episode(0, keys=["action"])
        assert len(episode["action"]) == agent.t and np.allclose(episode["action"][-1], [0.5, 0, 0, 1])
    finally:
        agent.close(timeout=2)
        if server is not None:
            server.stop()


def test_flotilla_demo_runs_two_tiny_rounds(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flotilla.cli",
            "demo",
            f"out={out}",
            "rounds=2",
            "demos.episodes=3",
            "demos.train_steps=4",
            "train.steps=4",
            "train.batch_size=8",
            "fleet.robots=2",
            "fleet.operators=1",
            "fleet.episodes_per_robot=1",
            "fleet.control_hz=40",
            "policy.down_dims=[8,16]",
            "calibration.episodes=2",
            "safety.pilot_episodes=2",
            "safety.model.flow_steps=5",
            "safety.model.risk_steps=5",
            "progress=false",
            "train.progress=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # hydra's demo.log lands in tmp_path
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "auto success" in result.stdout and "ROHE" in result.stdout
    assert "over all rounds:" in result.stdout and "hard resets" in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert [r["episodes"] for r in report["rounds"]] == [2, 2]
    assert [r["policy_version"] for r in report["rounds"]] == ["reach-r0", "reach-r1"]  # hot-swapped
    assert report["totals"]["episodes"] == 4
    # Each round's uncertainty and risk thresholds were fixed from its deployed policy's 2 held-out
    # rollouts; every published policy carried safety models (the initial one's learned from 2 pilot runs).
    assert [t["episodes"] for t in report["timings"]["thresholds"]] == [2, 2]
    assert all(t["risk"] is not None for t in report["timings"]["thresholds"])
    assert EpisodeStore.open(out / "pilot.zarr").num_episodes == 2
    for version in ("reach-r0", "reach-r1"):
        assert (out / "registry" / version / "safety.json").exists()
    assert report["totals"]["human_action_steps"] == sum(r["human_action_steps"] for r in report["rounds"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EpisodeStore.open(out / "fleet.zarr").num_episodes == 4
    assert (out / "registry" / "reach-r0" / "config.json").exists()
    # warm_start (the default): round 2's policy was fine-tuned from the one deployed in round 1.
    retrained = json.loads(
        (out / "train" / "reach-r1" / "checkpoints" / "latest" / "config.json").read_text()
    )
    assert retrained["training"]["init_from"] == str(out / "train" / "reach-r0" / "checkpoints" / "latest")


def test_fleet_benchmark_summarizes_runs_over_seeds(tmp_path):
    from benchmarks.fleet import plot, run_totals, summary_table

    def rounds(autonomous, human):
        return [
            {
                "robots": 4,
                "operators": 2,
                "episodes": 10,
                "successes": a + 1,
                "autonomous_successes": a,
                "autonomous_success_rate": a / 10,
                "human_action_steps": h,
                "interventions": 3,
                "hard_resets": 1,
                "idle_steps": 5,
                "constraint_violations": 1,
                "robot_steps": 300,
                "rohe": 0.1,
            }
            for a, h in zip(autonomous, human, strict=True)
        ]

    records = [
        {"seed": 0, "policy": "cur", "rounds": rounds([2, 4], [10, 9])},
        {"seed": 1, "policy": "cur", "rounds": rounds([4, 6], [10, 9])},
        {"seed": 0, "policy": "random", "rounds": rounds([1, 1], [30, 30])},
    ]
    totals = run_totals(records[0]["rounds"])
    # ROHE over all rounds: (M / N) * autonomous successes / (1 + human action steps).
    assert totals["rohe"] == pytest.approx(0.5 * 6 / 20)
    assert totals["final_success"] == 0.4 and totals["human_steps"] == 19 and totals["hard_resets"] == 2
    table = summary_table(records).splitlines()
    assert table[2].startswith("| C.U.R. | ") and "50% +- 10%" in table[2] and "19 +- 0" in table[2]
    assert table[3].startswith("| random (always busy) | ")
    # The IFL repository's ROHE: successes - 0.01 * human actions (seed 0's C.U.R.: 8 - 0.19).
    assert totals["ifl_rohe"] == pytest.approx(8 - 0.19)
    plot(records, tmp_path / "allocation.png")
    assert (tmp_path / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Held-out evaluations of the initial and final policies become two more columns.
    for record, final in zip(records, (0.6, 0.8, 0.3), strict=True):
        record["eval"] = {"episodes": 50, "initial": 0.4, "final": final}
    table = summary_table(records).splitlines()
    assert "held-out success, final (50 eps)" in table[0]
    assert table[2].endswith("| 40% +- 0% | 70% +- 10% |") and table[3].endswith("| 40% +- 0% | 30% +- 0% |")


def test_fleet_benchmark_finds_the_checkpoint_each_round_deployed(tmp_path):
    from benchmarks.fleet import deployed_checkpoint

    record = {
        "seed": 2,
        "policy": "cur",
        "rounds": [{"policy_version": "push-r0"}, {"policy_version": "push-r1"}],
    }
    # r0 is trained once per seed and shared by every allocation policy; later versions are the run's own.
    assert deployed_checkpoint(tmp_path, record, 0) == tmp_path / "seed2/train/push-r0/checkpoints/latest"
    assert (
        deployed_checkpoint(tmp_path, record, -1) == tmp_path / "seed2/cur/train/push-r1/checkpoints/latest"
    )


def test_cumulative_totals_add_rounds_up():
    from sim.metrics import cumulative

    first = {
        "robots": 4,
        "operators": 2,
        "episodes": 10,
        "successes": 6,
        "autonomous_successes": 4,
        "autonomous_success_rate": 0.4,
        "interventions": 3,
        "human_action_steps": 30,
        "idle_steps": 12,
        "hard_resets": 1,
        "constraint_violations": 2,
        "robot_steps": 400,
    }
    second = {
        **first,
        "successes": 9,
        "autonomous_successes": 8,
        "autonomous_success_rate": 0.8,
        "human_action_steps": 9,
        "hard_resets": 0,
        "constraint_violations": 0,
    }
    totals = cumulative([first, second])
    assert totals["episodes"] == 20 and totals["successes"] == 15 and totals["autonomous_successes"] == 12
    assert (
        totals["human_action_steps"] == 39
        and totals["hard_resets"] == 1
        and totals["constraint_violations"] == 2
    )
    assert totals["idle_steps"] == 24 and totals["final_autonomous_success_rate"] == 0.8
    assert totals["rohe"] == pytest.approx(0.5 * 12 / 40)
