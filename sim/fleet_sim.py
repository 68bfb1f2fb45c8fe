"""A simulated fleet: N pybullet robots and M scripted operators against a real fleet server over gRPC.

Each robot is a task env (sim/tasks) + its own PolicyRunner + the RobotAgent the real robots run
(fleet/agent.py); each operator is an OperatorClient (exactly what the web console uses) + the task's
scripted expert with a human-like reaction delay. One loop steps every robot at `control_hz` of wall
time; set the server's allocation tick_hz to the same rate, since the server counts t_T and t_R in
ticks and one tick must be one robot step (10 Hz is real time; higher runs the sim faster than that).
With an in-process server, `server_tick=lockstep_tick(server_thread)` makes that exact whatever the
machine's load: the harness ticks the allocator itself after every fleet step (once the server has
every step of it), and the server's own timer is set to (practically) never fire.

    fleet = SimFleet(address, tokens, "reach", n_robots=4, n_operators=2, control_hz=10).start()
    metrics = fleet.run_round(episodes_per_robot=5)        # sim.metrics.RoundMetrics
    fleet.close()

`run_fleet(...)` does the same for a number of rounds; `flotilla fleet` (configs/fleet.yaml) is `run`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleet import codec
from fleet.agent import HOLD_SERVER, HOLD_VIOLATION, AgentStep, RobotAgent, observation_spec
from fleet.client import OperatorClient, RobotClient
from fleet.proto import flotilla_pb2 as pb
from policies.fleet_policies import RegistryPolicies
from policies.threads import set_torch_threads
from sim.experts import make_expert
from sim.metrics import EpisodeTally, RoundMetrics, summarize
from sim.tasks import make_env

log = logging.getLogger(__name__)

GRIPPER_INDEX = 3  # sim/conventions.py: [dx, dy, dz, gripper]


# ------------------------------------------------------------------------------------------ policies


# ----------------------------------------------------------------------------------------- operators


class SimOperator:
    """A scripted stand-in for a human at the console, driven by the server's updates.

    Assigned a robot, it acts from the RobotFrames the server pushes (through the task expert, with its
    reaction delay). A blocked robot gets a ResetRobot (the server times the t_R reset). It releases
    the robot once it has served the assignment's t_T and `extra_steps` more, unless the allocator
    released it first. The frame lacks the episode goal, so `goal_of(robot_id)` supplies it: the one
    thing it reads from the simulation, standing for the goal a human sees in the camera view.
    """

    def __init__(
        self,
        address: str,
        token: str,
        operator_id: str,
        task: str,
        goal_of: Callable[[str], np.ndarray],
        expert_kwargs: Mapping | None = None,
        extra_steps: int = 5,
        seed: int = 0,
        on_queue: Callable[[pb.Queue], None] | None = None,
        backoff: tuple[float, float] = (0.1, 2.0),
        record: bool = False,
    ):
        self.operator_id = operator_id
        self.expert = make_expert(task, seed=seed, **dict(expert_kwargs or {}))
        self._goal_of = goal_of
        self._extra_steps = extra_steps
        self._on_queue = on_queue
        self.robot_id: str | None = None  # the robot it controls now
        self._goal: np.ndarray | None = None  # the goal of the episode it is acting in
        self.resetting = False
        self._min_steps = 0
        self._acted = 0
        self._release_sent = False
        self.assignments = 0
        self.resets = 0
        self.reset_steps = 0  # t_R, as the server's assignments say
        self.errors: list[str] = []
        self.sent: list[tuple[str, int, np.ndarray]] | None = (
            [] if record else None
        )  # (robot, frame seq, action)
        self.client = OperatorClient(address, token, operator_id, on_update=self._on_update, backoff=backoff)

    def start(self) -> SimOperator:
        self.client.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        self.client.close(timeout)

    def _on_update(self, update: pb.OperatorUpdate) -> None:  # on the client's thread, in order
        kind = update.WhichOneof("kind")
        if kind == "assignment":
            assignment = update.assignment
            self.robot_id, self.resetting = assignment.robot_id, assignment.needs_reset
            self._min_steps, self._acted, self._release_sent = assignment.min_steps, 0, False
            self.assignments += 1
            if assignment.needs_reset:
                self.resets += 1
                self.reset_steps = max(self.reset_steps, assignment.reset_steps)
                self.client.reset(assignment.robot_id)  # what a person does at the console
            else:
                self.expert.reset()  # a takeover: the operator starts looking now
                self._goal = None
        elif kind == "released":
            if update.released.robot_id == self.robot_id:
                self.robot_id, self.resetting = None, False
        elif kind == "frame":
            self._act(update.frame)
        elif kind == "queue" and self._on_queue is not None:
            self._on_queue(update.queue)
        elif kind == "error":
            self.errors.append(update.error.message)
            log.debug("operator %s: server said %s", self.operator_id, update.error.message)

    def _act(self, frame: pb.RobotFrame) -> None:
        if frame.robot_id != self.robot_id or self.resetting or frame.mode != pb.MODE_TELEOP:
            return
        obs = {key: codec.from_tensor(tensor) for key, tensor in frame.observation.items()}
        obs["goal"] = self._goal_of(frame.robot_id)
        if self._goal is not None and not np.array_equal(obs["goal"], self._goal):
            # A takeover that outlasts the robot's episode: a person sees the scene reset and starts
            # afresh, rather than acting on what they saw of the last episode.
            self.expert.reset()
        self._goal = obs["goal"]
        action = self.expert.act(obs)
        self.client.act(frame.robot_id, action, seq=frame.seq, frame_seq=frame.seq)
        if self.sent is not None:
            self.sent.append((frame.robot_id, frame.seq, action))
        self._acted += 1
        if not self._release_sent and self._acted >= self._min_steps + self._extra_steps:
            self.client.release(frame.robot_id)  # back on track: hand it to its policy
            self._release_sent = True


# -------------------------------------------------------------------------------------------- robots


@dataclass
class StepRecord:
    """One robot step as the harness saw it (kept when `record_steps`)."""

    robot_id: str
    tick: int  # the fleet step it was taken in (a robot that finished its episodes skips ticks)
    episode_id: int
    t: int
    label: int
    control: str
    operator_id: str
    action: np.ndarray
    policy_version: str


@dataclass
class SimRobot:
    robot_id: str
    env: object
    agent: RobotAgent
    seed: int
    episodes_begun: int = 0
    obs: dict | None = None
    info: dict = field(default_factory=dict)
    record: EpisodeTally | None = None  # the open episode
    blocked_steps: int = 0
    waited_steps: int = 0  # fleet steps waited between episodes for a human to hand the robot back

    @property
    def in_episode(self) -> bool:
        return self.record is not None


class SimFleet:
    """N sim robots and M sim operators connected to the fleet server at `address` (see module docstring).

    `tokens`: {"robot": ..., "operator": ...}. `policy`: a registry version to start from ("" = latest)
    or a factory `(robot_id) -> policy` (each robot gets its own). `load_policy(version)`: how robots load
    a newly published version (default: RegistryPolicies into `cache_dir`, on `device`: auto | cpu | cuda |
    cuda:N, one copy of the weights for every robot). `batched`: the robots share one BatchedPlanner
    (policies/batched.py): each tick steps them in threads, and the plans due in it run as one batched call
    (a GPU is not left idle between batch-1 calls). `server_tick`: see the module docstring.
    """

    def __init__(
        self,
        address: str,
        tokens: Mapping[str, str],
        task: str,
        n_robots: int = 4,
        n_operators: int = 2,
        *,
        policy: str | Callable[[str], object] = "",
        load_policy: Callable[[str], object] | None = None,
        cache_dir: str | Path = "data/policy_cache",
        num_samples: int = 4,
        device: str = "auto",
        batched: bool = False,
        control_hz: float = 10.0,
        env_kwargs: Mapping | None = None,
        expert_kwargs: Mapping | None = None,
        operator_extra_steps: int = 5,
        blocked_timeout_steps: int = 200,
        seed: int = 0,
        record_steps: bool = False,
        backoff: tuple[float, float] = (0.1, 2.0),
        root_certificates=None,
        server_tick: Callable[[], None] | None = None,
    ):
        if n_robots < 1 or n_operators < 0 or control_hz <= 0:
            raise ValueError(
                f"need n_robots >= 1, n_operators >= 0, control_hz > 0 "
                f"(got {n_robots}, {n_operators}, {control_hz})"
            )
        self.address, self.task = address, task
        self.n_robots, self.n_operators = n_robots, n_operators
        self.control_hz = control_hz
        self.blocked_timeout_steps = blocked_timeout_steps
        self._tokens = dict(tokens)
        self._policy = policy
        self.planner = None
        if batched:
            from concurrent.futures import ThreadPoolExecutor

            from policies.batched import BatchedPlanner  # torch only when asked for

            self.planner, self._pool = BatchedPlanner(), ThreadPoolExecutor(n_robots, "sim-robot")
        self._load_policy = load_policy or RegistryPolicies(
            address,
            self._tokens["robot"],
            cache_dir,
            num_samples,
            root_certificates,
            device=device,
            planner=self.planner,
        )
        self._env_kwargs = dict(env_kwargs or {})
        self._expert_kwargs = dict(expert_kwargs or {})
        self._operator_extra_steps = operator_extra_steps
        self._seed = seed
        self._backoff = backoff
        self._root_certificates = root_certificates
        self._server_tick = server_tick
        self.robots: list[SimRobot] = []
        self.operators: list[SimOperator] = []
        self._goals: dict[str, np.ndarray] = {}
        self.queue: dict[str, str] = {}  # robot -> operator ("" while waiting), from the console's queue view
        self.finished: list[EpisodeTally] = []
        self.steps: list[StepRecord] | None = [] if record_steps else None
        self.overruns = 0  # control periods the loop could not keep
        self.ticks = 0  # fleet steps so far
        self.rounds = 0

    # -- setup -------------------------------------------------------------------------------------

    def start(self) -> SimFleet:
        for index in range(self.n_operators):
            self.add_operator(f"sim-operator-{index}")
        for index in range(self.n_robots):
            self.add_robot(f"sim-robot-{index}", seed=self._seed + 100_000 * index)
        return self

    def add_operator(self, operator_id: str) -> SimOperator:
        operator = SimOperator(
            self.address,
            self._tokens["operator"],
            operator_id,
            self.task,
            self._goal_of,
            self._expert_kwargs,
            self._operator_extra_steps,
            seed=self._seed + len(self.operators),
            on_queue=self._set_queue,
            backoff=self._backoff,
            record=self.steps is not None,
        )
        self.operators.append(operator.start())
        return operator

    def add_robot(self, robot_id: str, seed: int) -> SimRobot:
        env = make_env(self.task, seed=seed, **self._env_kwargs)
        obs, _ = env.reset(seed=seed)
        policy = self._policy(robot_id) if callable(self._policy) else self._load_policy(self._policy)
        client = RobotClient(
            self.address,
            self._tokens["robot"],
            robot_id,
            self.task,
            observation_spec(obs),
            action_dim=env.action_space.shape[0],
            goal_dim=int(np.asarray(obs["goal"]).size),
            policy_version=str(getattr(policy, "version", "")),
            backoff=self._backoff,
            root_certificates=self._root_certificates,
        )
        agent = RobotAgent(
            client,
            policy,
            load_policy=self._load_policy,
            gripper_index=GRIPPER_INDEX,
            teleop_timeout_s=3.0 / self.control_hz,
        ).start()
        robot = SimRobot(robot_id, env, agent, seed)
        self.robots.append(robot)
        return robot

    def _goal_of(self, robot_id: str) -> np.ndarray:
        return self._goals[robot_id]

    def _set_queue(self, queue: pb.Queue) -> None:
        self.queue = {entry.robot_id: entry.assigned_to for entry in queue.entries}

    @property
    def reset_steps(self) -> int:
        """t_R as the server's reset assignments said (0 before any)."""
        return max((operator.reset_steps for operator in self.operators), default=0)

    def wait_connected(self, timeout: float = 30.0) -> bool:
        """Wait until every robot has heard from the server (its first Command)."""
        deadline = time.monotonic() + timeout
        while any(robot.agent.client.state.mode == pb.MODE_UNSPECIFIED for robot in self.robots):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_for_policy(self, version: str, timeout: float = 120.0) -> bool:
        """Between rounds: wait until every robot has `version` loaded (it swaps in at its next episode)."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [
                robot
                for robot in self.robots
                if robot.agent.version != version and robot.agent.poll_policy() != version
            ]
            if not waiting:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    # -- running -----------------------------------------------------------------------------------

    def run_round(
        self, episodes_per_robot: int, max_steps: int | None = None, progress: bool = False
    ) -> RoundMetrics:
        """Every robot runs `episodes_per_robot` episodes (a robot done early idles); returns the round's metrics.

        `max_steps` caps the round in control steps (open episodes then end as "round_end").
        """
        self.rounds += 1
        started, first = time.monotonic(), len(self.finished)
        quota = {robot.robot_id: robot.episodes_begun + episodes_per_robot for robot in self.robots}
        period = 1.0 / self.control_hz
        next_tick, steps = time.monotonic(), 0
        while any(robot.in_episode or robot.episodes_begun < quota[robot.robot_id] for robot in self.robots):
            if max_steps is not None and steps >= max_steps:
                for robot in self.robots:
                    self._end_episode(robot, False, "round_end")
                break
            self.step(quota)
            steps += 1
            if progress and steps % int(10 * self.control_hz) == 0:
                done = len(self.finished) - first
                print(
                    f"  round {self.rounds}: {steps} steps, {done}/{episodes_per_robot * len(self.robots)} "
                    f"episodes",
                    flush=True,
                )
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -period:  # too far behind to catch up: start the schedule afresh
                self.overruns += 1
                next_tick = time.monotonic()
        return summarize(
            self.finished[first:],
            self.rounds,
            len(self.robots),
            len(self.operators),
            self.reset_steps,
            time.monotonic() - started,
        )

    def step(self, quota: Mapping[str, int] | None = None) -> None:
        """One control tick of every robot (starting an episode where one is due)."""
        self.ticks += 1
        if self.planner is None:
            for robot in self.robots:
                if self._due(robot, quota):
                    self._tick(robot)
        else:
            due = [robot for robot in self.robots if self._due(robot, quota)]
            with self.planner.tick(len(due)):
                list(self._pool.map(self._tick_then_finish, due))
        if self._server_tick is not None:
            self.flush(timeout=5.0)  # the allocator must see this step of every robot before it ticks
            self._server_tick()

    def _due(self, robot: SimRobot, quota: Mapping[str, int] | None) -> bool:
        """Whether the robot steps in this tick (beginning its next episode if one is due)."""
        if not robot.in_episode:
            if quota is not None and robot.episodes_begun >= quota[robot.robot_id]:
                return False
            if self._human_still_on(robot):
                return False
            self._begin_episode(robot)
        return True

    def _tick_then_finish(self, robot: SimRobot) -> None:
        try:
            self._tick(robot)
        finally:
            self.planner.finish()

    def _human_still_on(self, robot: SimRobot) -> bool:
        """Between episodes, a robot whose episode a human finished waits for that human to hand it back
        (the rest of t_T) before it begins the next one, as a scene reset would take that long. Else
        the human would carry the takeover into the new episode and drive it from its first step (on
        reach, half the episodes), leaving the policy nothing to show; at most blocked_timeout_steps."""
        if (
            robot.agent.client.state.mode != pb.MODE_TELEOP
            or robot.waited_steps >= self.blocked_timeout_steps
        ):
            robot.waited_steps = 0
            return False
        robot.waited_steps += 1
        return True

    def _begin_episode(self, robot: SimRobot) -> None:
        seed = robot.seed + robot.episodes_begun
        robot.obs, robot.info = robot.env.reset(seed=seed)
        self._goals[robot.robot_id] = np.asarray(robot.obs["goal"], np.float32)
        episode_id = robot.agent.begin_episode(robot.obs["goal"])
        robot.episodes_begun += 1
        robot.blocked_steps = 0
        robot.record = EpisodeTally(robot.robot_id, episode_id, robot.agent.version)

    def _tick(self, robot: SimRobot) -> None:
        result: AgentStep = robot.agent.step(robot.obs, robot.info)
        record = robot.record
        if result.reset:  # a human reset: the agent ended the episode
            record.hard_reset = True
            self._close_record(robot, False, "reset")
            return
        assigned = self.queue.get(robot.robot_id)
        queued = assigned == ""
        waiting = result.control in (HOLD_VIOLATION, HOLD_SERVER) and not assigned
        record.count(result.label, idle=queued or waiting)
        if self.steps is not None:
            self.steps.append(
                StepRecord(
                    robot.robot_id,
                    self.ticks,
                    record.episode_id,
                    robot.agent.t - 1,
                    int(result.label),
                    result.control,
                    result.operator_id,
                    result.action,
                    robot.agent.version,
                )
            )
        robot.obs, _, terminated, truncated, robot.info = robot.env.step(result.action)
        record.violation = record.violation or bool(robot.info.get("constraint_violation"))
        if robot.info.get("blocked"):
            # Blocked robots wait for a human reset, past the step limit; after blocked_timeout_steps
            # without one (no operators, say) the episode is given up.
            robot.blocked_steps += 1
            if robot.blocked_steps >= self.blocked_timeout_steps:
                self._end_episode(robot, False, "violation")
        elif terminated or truncated:
            success = bool(robot.info.get("success"))
            self._end_episode(robot, success, "success" if success else "timeout")

    def _end_episode(self, robot: SimRobot, success: bool, outcome: str) -> None:
        if robot.in_episode:
            robot.agent.end_episode(success, outcome)
            self._close_record(robot, success, outcome)

    def _close_record(self, robot: SimRobot, success: bool, outcome: str) -> None:
        robot.record.success, robot.record.outcome = success, outcome
        self.finished.append(robot.record)
        robot.record = None

    # -- teardown ----------------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the server has acked every step the robots sent."""
        return all(robot.agent.client.wait_acked(timeout=timeout) for robot in self.robots)

    def close(self, timeout: float = 5.0) -> None:
        for robot in self.robots:
            if robot.in_episode:
                self._end_episode(robot, False, "shutdown")
            robot.agent.close(timeout)
            robot.env.close()
        for operator in self.operators:
            operator.close()
        if self.planner is not None:
            self._pool.shutdown()

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def lockstep_tick(server) -> Callable[[], None]:
    """`server_tick` for a fleet.server.ServerThread: one allocation tick on the server's loop."""
    return lambda: server.call(server.server.fleet.tick)


def run_fleet(
    server_address: str,
    tokens: Mapping[str, str],
    task: str,
    n_robots: int = 4,
    n_operators: int = 2,
    episodes_per_robot: int = 5,
    rounds: int = 1,
    policy: str | Callable[[str], object] = "",
    between_rounds: Callable[[int, RoundMetrics], str | None] | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    **fleet_kwargs,
) -> list[RoundMetrics]:
    """Run `rounds` rounds of the sim fleet against a server; returns each round's metrics.

    `between_rounds(round, metrics)` may return a newly published version: the fleet waits until every
    robot has it loaded, so the next round runs on it. `on_round(metrics)` sees each round as it ends.
    """
    results = []
    with SimFleet(
        server_address, tokens, task, n_robots, n_operators, policy=policy, **fleet_kwargs
    ) as fleet:
        if not fleet.wait_connected():
            raise RuntimeError(f"fleet server at {server_address} did not answer every robot within 30 s")
        for index in range(rounds):
            metrics = fleet.run_round(episodes_per_robot)
            results.append(metrics)
            if on_round is not None:
                on_round(metrics)
            if between_rounds is not None and index + 1 < rounds:
                version = between_rounds(index + 1, metrics)
                if version and not fleet.wait_for_policy(version):
                    raise RuntimeError(f"robots did not load policy {version} in time")
        fleet.flush()
    return results


def run(cfg) -> None:
    """`flotilla fleet` (configs/fleet.yaml): sim robots and operators against a running server."""
    import json

    import grpc
    from omegaconf import OmegaConf

    from configs.schema import ConfigError
    from policies.device import resolve_device
    from sim.metrics import table_header, table_row

    logging.getLogger().setLevel(cfg.log_level)
    set_torch_threads(cfg.threads)
    resolve_device(cfg.device)  # device=cuda without a GPU is one line before any robot connects
    print(table_header(), flush=True)
    try:
        results = run_fleet(
            cfg.server,
            {"robot": cfg.tokens.robot, "operator": cfg.tokens.operator},
            cfg.task.name,
            cfg.robots,
            cfg.operators,
            cfg.episodes_per_robot,
            cfg.rounds,
            policy=cfg.policy_version or "",
            on_round=lambda metrics: print(table_row(metrics), flush=True),
            cache_dir=cfg.cache_dir,
            num_samples=cfg.num_samples,
            device=cfg.device,
            batched=cfg.batched,
            control_hz=cfg.control_hz,
            env_kwargs={"max_steps": cfg.task.max_steps, **cfg.task.env},
            expert_kwargs=OmegaConf.to_container(cfg.operator.expert, resolve=True),
            operator_extra_steps=cfg.operator.extra_steps,
            seed=cfg.seed,
        )
    except grpc.RpcError as err:  # the first policy fetch: no server there, an empty registry, a bad token
        raise ConfigError("server", f"{cfg.server}: {err.code().name}: {err.details()}") from None
    if cfg.metrics_out:
        Path(cfg.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.metrics_out).write_text(json.dumps([m.to_dict() for m in results], indent=2))
        print(f"metrics: {cfg.metrics_out}")
