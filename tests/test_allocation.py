"""Behaviour of the fleet server's human allocation (fleet/allocation/)."""

import pickle

import numpy as np
import pytest

from fleet.allocation import (
    CONSTRAINT,
    NO_LONGER_NEEDED,
    NO_NEED,
    OPERATOR_DISCONNECTED,
    OPERATOR_RELEASE,
    RESET_DONE,
    RISK,
    ROBOT_DISCONNECTED,
    UNCERTAINTY,
    Allocator,
    AllocatorConfig,
    CURConfig,
    FlotillaConfig,
    Priority,
    QuantileThreshold,
    RandomConfig,
    RandomRule,
    RobotSlot,
    Signals,
    make_allocator,
    register_rule,
)

# Fixed thresholds of 0.5 on both signals unless a test says otherwise.
FIXED = dict(uncertainty_threshold=0.5, risk_threshold=0.5)


def fleet(n: int) -> dict[str, RobotSlot]:
    return {f"r{i}": RobotSlot(f"r{i}") for i in range(n)}


def signal(robots, robot_id, uncertainty=0.0, risk=0.0, violation=False):
    robots[robot_id].signals = Signals(uncertainty=uncertainty, risk=risk, constraint_violation=violation)


def assigned(decisions) -> dict[str, str]:
    return {a.operator_id: a.robot_id for a in decisions.assignments}


def released(decisions) -> dict[str, str]:
    return {r.robot_id: r.reason for r in decisions.releases}


@pytest.mark.parametrize("rule", ["flotilla", "cur"])
def test_highest_priority_gets_the_free_operator(rule):
    robots = fleet(4)
    signal(robots, "r1", uncertainty=0.6)
    signal(robots, "r2", uncertainty=0.9)
    signal(robots, "r3", uncertainty=0.2)  # below threshold: never served
    allocator = make_allocator(rule, t_T=5, **FIXED)

    decisions = allocator.tick(robots.values(), ["op"])
    assert assigned(decisions) == {"op": "r2"}
    assert decisions.assignments[0].reason == UNCERTAINTY
    assert robots["r2"].controller == "op"

    # A second operator comes on duty: the next in line, never the robot below threshold.
    assert assigned(allocator.tick(robots.values(), ["op", "op2"])) == {"op2": "r1"}
    assert allocator.tick(robots.values(), ["op", "op2", "op3"]).assignments == []


def test_min_intervention_time_is_respected():
    t_T = 4
    robots = fleet(1)
    signal(robots, "r0", uncertainty=0.9)
    allocator = make_allocator("cur", t_T=t_T, **FIXED)
    assert assigned(allocator.tick(robots.values(), ["op"])) == {"op": "r0"}

    signal(robots, "r0", uncertainty=0.0)  # no longer needs help right away
    allocator.operator_release(robots["r0"], "op")  # and the operator asks to hand back
    for _ in range(t_T - 1):
        assert allocator.tick(robots.values(), ["op"]).releases == []
        assert robots["r0"].controller == "op"
    assert released(allocator.tick(robots.values(), ["op"])) == {"r0": OPERATOR_RELEASE}
    assert robots["r0"].controller is None


def test_robot_still_needing_help_keeps_its_operator_after_t_T():
    robots = fleet(1)
    signal(robots, "r0", risk=0.8)
    allocator = make_allocator("cur", t_T=2, **FIXED)
    allocator.tick(robots.values(), ["op"])
    for _ in range(5):
        assert allocator.tick(robots.values(), ["op"]).releases == []
    signal(robots, "r0", risk=0.1)
    assert released(allocator.tick(robots.values(), ["op"])) == {"r0": NO_LONGER_NEEDED}


def test_constraint_violation_blocks_and_reset_takes_exactly_t_R():
    t_R = 3
    robots = fleet(2)
    signal(robots, "r0", violation=True)
    signal(robots, "r1", uncertainty=0.9)
    allocator = make_allocator("flotilla", t_T=1, t_R=t_R, **FIXED)

    # Without an operator the violation stays, whatever the time: the robot is blocked.
    for _ in range(5):
        allocator.tick(robots.values(), [])
    assert robots["r0"].blocked and robots["r0"].controller is None

    decisions = allocator.tick(robots.values(), ["op"])
    assert assigned(decisions) == {"op": "r0"}  # constraint first, before the uncertain robot
    (assignment,) = decisions.assignments
    assert assignment.needs_reset and assignment.reset_steps == t_R and assignment.reason == CONSTRAINT
    for _ in range(t_R - 1):
        assert allocator.tick(robots.values(), ["op"]).releases == []
        assert robots["r0"].resetting and robots["r0"].blocked
    decisions = allocator.tick(robots.values(), ["op"])
    assert released(decisions) == {"r0": RESET_DONE}
    assert not robots["r0"].blocked and not robots["r0"].resetting
    assert assigned(decisions) == {"op": "r1"}  # the freed operator moves on in the same tick


def test_violation_under_a_human_becomes_a_reset_by_that_operator():
    robots = fleet(1)
    signal(robots, "r0", uncertainty=0.9)
    allocator = make_allocator("cur", t_T=10, t_R=2, **FIXED)
    allocator.tick(robots.values(), ["op"])
    signal(robots, "r0", violation=True)
    decisions = allocator.tick(robots.values(), ["op"])
    assert [(a.operator_id, a.needs_reset) for a in decisions.assignments] == [("op", True)]
    allocator.tick(robots.values(), ["op"])
    assert released(allocator.tick(robots.values(), ["op"])) == {"r0": RESET_DONE}


def serve_order(order: str) -> list[str]:
    robots = fleet(4)
    signal(robots, "r0", uncertainty=0.6)
    signal(robots, "r1", risk=0.95)
    signal(robots, "r2", violation=True)
    signal(robots, "r3", uncertainty=0.8)
    allocator = make_allocator("cur", cur={"order": order}, t_T=100, **FIXED)
    served = []
    for k in range(4):  # one more operator each tick: each takes the best robot left
        served += assigned(allocator.tick(robots.values(), [f"op{i}" for i in range(k + 1)])).values()
    return served


def test_cur_ordering_and_custom_order():
    assert serve_order("cur") == ["r2", "r3", "r0", "r1"]  # C, then U by value, then R
    assert serve_order("cru") == ["r2", "r1", "r3", "r0"]
    assert serve_order("ruc") == ["r1", "r3", "r0", "r2"]


def test_quantile_threshold_hits_the_target_rate():
    rng = np.random.default_rng(0)
    alpha = 0.1
    calibration = QuantileThreshold(alpha, window=4000, min_samples=200)
    assert calibration.current().value == np.inf  # too few samples: no requests yet
    calibration.observe(rng.lognormal(0.0, 1.0, size=10_000))
    fresh = rng.lognormal(0.0, 1.0, size=20_000)
    rate = np.mean(fresh >= calibration.current().value)
    assert abs(rate - alpha) < 0.02

    # The window forgets: after a shift, the threshold follows the new distribution.
    calibration.observe(rng.lognormal(1.0, 1.0, size=4000))
    rate = np.mean(rng.lognormal(1.0, 1.0, size=20_000) >= calibration.current().value)
    assert abs(rate - alpha) < 0.02


def test_calibrated_allocator_requests_help_at_the_target_rate():
    rng = np.random.default_rng(1)
    alpha, n_robots, ticks = 0.05, 20, 400
    allocator = make_allocator("cur", alpha=alpha, window=2000, min_samples=200)
    robots = fleet(n_robots)
    requests = steps = 0
    for t in range(ticks):
        for robot in robots.values():
            robot.signals = Signals(uncertainty=float(rng.gamma(2.0)), risk=float(rng.beta(2, 5)))
        allocator.tick(robots.values(), [])  # no operators: every robot stays autonomous
        if t >= 50:
            queue = allocator.queue()
            requests += sum(entry.reason == UNCERTAINTY for entry in queue)
            steps += n_robots
    thresholds = allocator.thresholds
    assert np.isfinite(thresholds.uncertainty.value) and np.isfinite(thresholds.risk.value)
    assert abs(requests / steps - alpha) < 0.015


def run_random(seed: int) -> list[str]:
    """Which robot one operator gets, over 30 fresh fleets of 8 equally needy robots and 2 quiet ones."""
    allocator = make_allocator("random", seed=seed, **FIXED)
    served = []
    for _ in range(30):
        robots = fleet(10)
        for i in range(8):
            signal(robots, f"r{i}", uncertainty=0.9)
        served += assigned(allocator.tick(robots.values(), ["op"])).values()
    return served


def test_random_rule_is_deterministic_for_a_seed():
    assert run_random(3) == run_random(3)
    assert run_random(3) != run_random(4)
    assert set(run_random(3)) == {f"r{i}" for i in range(8)}  # all needy robots, never a quiet one


def test_random_all_scope_serves_robots_without_need():
    robots = fleet(3)  # all quiet
    allocator = make_allocator("random", random={"scope": "all"}, seed=0, t_T=2, **FIXED)
    first = assigned(allocator.tick(robots.values(), ["op"]))["op"]
    allocator.tick(robots.values(), ["op"])
    # Its turn ends after t_T and the human moves on to another, freshly drawn robot.
    decisions = allocator.tick(robots.values(), ["op"])
    assert released(decisions) == {first: NO_LONGER_NEEDED}
    assert assigned(decisions)["op"] != first


def test_operator_disconnect_requeues_the_robot_first():
    robots = fleet(3)
    signal(robots, "r0", uncertainty=0.6)
    allocator = make_allocator("cur", t_T=10, **FIXED)
    assert assigned(allocator.tick(robots.values(), ["a"])) == {"a": "r0"}
    signal(robots, "r1", uncertainty=0.95)  # now a more uncertain robot waits

    releases = allocator.operator_disconnected("a", robots.values())
    assert [(r.robot_id, r.operator_id, r.reason) for r in releases] == [("r0", "a", OPERATOR_DISCONNECTED)]
    assert robots["r0"].controller is None
    decisions = allocator.tick(robots.values(), ["b"])
    assert assigned(decisions) == {"b": "r0"}  # ahead of r1 despite r1's higher uncertainty


def test_operator_missing_from_duty_is_treated_as_disconnected():
    robots = fleet(2)
    signal(robots, "r0", uncertainty=0.6)
    signal(robots, "r1", uncertainty=0.95)
    allocator = make_allocator("cur", t_T=10, **FIXED)
    allocator.tick(robots.values(), ["a", "b"])
    assert robots["r0"].controller == "b"
    decisions = allocator.tick(robots.values(), ["a", "c"])  # b vanished without a word
    assert released(decisions) == {"r0": OPERATOR_DISCONNECTED}
    assert assigned(decisions) == {"c": "r0"}


def test_robot_disconnect_frees_the_operator():
    robots = fleet(2)
    signal(robots, "r0", uncertainty=0.9)
    signal(robots, "r1", uncertainty=0.6)
    allocator = make_allocator("flotilla", t_T=10, **FIXED)
    assert assigned(allocator.tick(robots.values(), ["op"])) == {"op": "r0"}
    release = allocator.robot_disconnected(robots["r0"])
    assert (release.robot_id, release.operator_id, release.reason) == ("r0", "op", ROBOT_DISCONNECTED)
    assert not robots["r0"].connected and robots["r0"].controller is None
    assert assigned(allocator.tick(robots.values(), ["op"])) == {"op": "r1"}


def flaps(hysteresis: float) -> int:
    """Times a robot whose uncertainty hovers around the threshold enters the queue."""
    robots = fleet(1)
    # Too few samples for a typical value, so it is 0: one unit of exceedance is the threshold, 0.5.
    allocator = make_allocator("flotilla", flotilla={"hysteresis": hysteresis}, min_samples=1000, **FIXED)
    entries, queued = 0, False
    for t in range(40):
        signal(robots, "r0", uncertainty=0.5 + (0.03 if t % 2 == 0 else -0.03))
        allocator.tick(robots.values(), [])
        now = any(entry.robot_id == "r0" for entry in allocator.queue())
        entries += now and not queued
        queued = now
    return entries


def test_flotilla_hysteresis_prevents_flapping():
    assert flaps(hysteresis=0.0) == 20
    assert flaps(hysteresis=0.25) == 1


def test_flotilla_hysteresis_keeps_the_human_until_clearly_below():
    robots = fleet(1)
    allocator = make_allocator("flotilla", t_T=1, flotilla={"hysteresis": 0.5, "signal": "risk"}, **FIXED)
    signal(robots, "r0", risk=0.6)  # it leaves below 0.25
    allocator.tick(robots.values(), ["op"])
    signal(robots, "r0", risk=0.4)  # under the threshold, inside the band
    for _ in range(5):
        assert allocator.tick(robots.values(), ["op"]).releases == []
    signal(robots, "r0", risk=0.2)
    assert released(allocator.tick(robots.values(), ["op"])) == {"r0": NO_LONGER_NEEDED}


def test_flotilla_combines_signals_where_cur_is_lexicographic():
    robots = fleet(2)
    signal(robots, "r0", uncertainty=0.55)  # barely past the uncertainty threshold
    signal(robots, "r1", risk=0.95)  # far past the risk threshold
    for rule, first in (("cur", "r0"), ("flotilla", "r1")):
        for robot in robots.values():
            robot.controller = None
        settings = {"flotilla": {"signal": "combined"}} if rule == "flotilla" else {}
        decisions = make_allocator(rule, **settings, **FIXED).tick(robots.values(), ["op"])
        assert assigned(decisions) == {"op": first}
    assert decisions.assignments[0].reason == RISK


def test_flotilla_ties_go_to_the_longest_waiting():
    robots = fleet(3)
    allocator = make_allocator("flotilla", t_T=100, **FIXED)
    signal(robots, "r2", violation=True)
    allocator.tick(robots.values(), [])
    allocator.tick(robots.values(), [])
    signal(robots, "r0", violation=True)  # blocked later, same priority, lower id
    allocator.tick(robots.values(), [])
    assert [entry.robot_id for entry in allocator.queue()] == ["r2", "r0"]
    assert assigned(allocator.tick(robots.values(), ["op"])) == {"op": "r2"}


def test_queue_lists_waiting_robots_in_order_then_assigned():
    robots = fleet(4)
    signal(robots, "r0", uncertainty=0.7)
    signal(robots, "r1", violation=True)
    signal(robots, "r2", risk=0.9)
    allocator = make_allocator("cur", **FIXED)
    allocator.tick(robots.values(), ["op"])
    rows = [(e.robot_id, e.reason, e.assigned_to) for e in allocator.queue()]
    assert rows == [("r0", UNCERTAINTY, None), ("r2", RISK, None), ("r1", CONSTRAINT, "op")]


def test_idle_robots_need_no_help():
    robots = fleet(1)
    signal(robots, "r0", uncertainty=0.9)
    robots["r0"].idle = True
    assert make_allocator("cur", **FIXED).tick(robots.values(), ["op"]).assignments == []


def test_operator_release_of_a_robot_it_does_not_control_is_refused():
    robots = fleet(1)
    with pytest.raises(ValueError, match="operator 'op' does not control robot 'r0'"):
        make_allocator().operator_release(robots["r0"], "op")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(t_T=-1), "t_T must be an integer >= 0"),
        (dict(t_R=-2), "t_R must be an integer >= 0"),
        (dict(t_T=1.5), "t_T must be an integer"),
        (dict(alpha=0.0), "alpha must be in \\(0, 1\\)"),
        (dict(alpha=1.0), "alpha must be in \\(0, 1\\)"),
        (dict(window=0), "window must be an integer >= 1"),
        (dict(window=10, min_samples=20), "min_samples \\(20\\) must not exceed window \\(10\\)"),
        (dict(rule="fifo"), "allocation.rule: unknown rule 'fifo'; rules: cur, flotilla, random"),
        (dict(cur={"order": "cux"}), "allocation.cur.order must be a permutation of 'cur'"),
        (dict(cur={"order": "cuu"}), "allocation.cur.order must be a permutation of 'cur'"),
        (dict(cur={"order": ""}), "allocation.cur.order must be a permutation of 'cur'"),
        (dict(cur={"warmup_penalty": -1}), "allocation.cur.warmup_penalty must be an integer >= 0"),
        (dict(cur={"violation_share": -0.5}), "allocation.cur.violation_share must be >= 0"),
        (dict(random={"budget": 1.5}), "allocation.random.budget must be in \\[0, 1\\]"),
        (dict(preempt="yes"), "allocation.preempt must be true or false"),
        (dict(flotilla={"hysteresis": -0.1}), "allocation.flotilla.hysteresis must be >= 0"),
        (dict(flotilla={"risk_weight": 2.0}), "allocation.flotilla.risk_weight must be in \\[0, 1\\]"),
        (dict(uncertainty_threshold=float("nan")), "uncertainty_threshold must be a finite number"),
        (dict(random={"scope": "some"}), "allocation.random.scope must be one of"),
    ],
)
def test_bad_config_values_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        AllocatorConfig.from_dict(settings)


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="allocation: unknown setting\\(s\\) \\['tT'\\]"):
        make_allocator("cur", tT=3)


def test_inconsistent_pairings_are_rejected():
    robots = fleet(2)
    robots["r0"].controller = robots["r1"].controller = "op"
    with pytest.raises(ValueError, match="operator 'op' controls both 'r0' and 'r1'"):
        Allocator().tick(robots.values(), ["op"])


def test_a_constant_signal_requests_no_help():
    from fleet.allocation import QuantileThreshold

    threshold = QuantileThreshold(alpha=0.05, window=100, min_samples=10)
    threshold.observe([0.0] * 50)  # e.g. risk before any risk model exists
    assert threshold.current().value == float("inf")


def test_a_mostly_constant_signal_flags_only_what_stands_out():
    from fleet.allocation import QuantileThreshold

    threshold = QuantileThreshold(alpha=0.05, window=100, min_samples=10)
    threshold.observe([0.0] * 98 + [0.7, 0.9])
    assert threshold.current().value == 0.7


# ------------------------------------------------------------------------------------ rules and config


def test_the_config_holds_every_rules_settings_and_round_trips():
    config = AllocatorConfig.from_dict({"rule": "cur", "t_T": 4, "cur": {"order": "cru"}, "random": None})
    assert config.rule_config == CURConfig(order="cru")
    assert (
        config.rule_configs["flotilla"] == FlotillaConfig()
        and config.rule_configs["random"] == RandomConfig()
    )
    assert AllocatorConfig.from_dict(config.to_dict()) == config
    assert pickle.loads(pickle.dumps(config)) == config  # the server's config goes to worker processes
    assert AllocatorConfig(rule="cur", rule_configs={"cur": CURConfig(order="cru")}, t_T=4) == config


@pytest.mark.parametrize(
    ("allocation", "message"),
    [
        ({"rule": "fifo"}, "allocation.rule: unknown rule 'fifo'; rules: cur, flotilla, random"),
        ({"flotila": {}}, "allocation: unknown setting\\(s\\) \\['flotila'\\]"),
        ({"flotilla": {"hysterisis": 0.1}}, "allocation.flotilla: unknown setting\\(s\\) \\['hysterisis'\\]"),
        ({"cur": "cru"}, "allocation.cur must be a mapping"),
        ({"tick_hz": 0}, "allocation.tick_hz must be positive"),
        ({"options": {"alpha": 0.1}}, "allocation: unknown setting\\(s\\) \\['options'\\]"),  # the old shape
    ],
)
def test_server_allocation_errors_name_the_key(allocation, message):
    from fleet.server import ServerConfig

    with pytest.raises(ValueError, match=message):
        ServerConfig.from_dict({"allocation": allocation})


def test_serve_yaml_lists_every_allocation_setting_at_its_default():
    from pathlib import Path

    from omegaconf import OmegaConf

    from fleet.server import AllocationConfig

    serve = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "serve.yaml")
    assert OmegaConf.to_container(serve.allocation) == AllocationConfig().to_dict()


def test_the_server_allocates_with_its_config_itself():
    from fleet.server import FleetServer, ServerConfig

    config = ServerConfig.from_dict({"allocation": {"rule": "random", "t_T": 7, "random": {"scope": "all"}}})
    allocator = FleetServer(config).allocator
    assert allocator.config is config.allocation and isinstance(allocator.rule, RandomRule)
    assert allocator.rule.scope == "all"


def test_a_new_rule_is_a_config_and_a_registered_class(monkeypatch):
    from dataclasses import dataclass

    from fleet.allocation import core

    monkeypatch.setattr(core, "RULES", dict(core.RULES))  # registered for this test only

    @dataclass(frozen=True)
    class LongestWaitConfig:
        min_uncertainty: float = 0.0

    @register_rule("longest_wait", LongestWaitConfig)
    class LongestWaitRule:
        """Every robot above min_uncertainty, longest waiting first."""

        def __init__(self, config: LongestWaitConfig, rng):
            self.min_uncertainty = config.min_uncertainty

        def __call__(self, robot: RobotSlot, thresholds) -> Priority:
            if robot.signals.uncertainty <= self.min_uncertainty:
                return NO_NEED
            return Priority(UNCERTAINTY, level=0, score=robot.waited_ticks)

    robots = fleet(3)
    signal(robots, "r0", uncertainty=0.2)
    signal(robots, "r2", uncertainty=0.05)
    allocator = make_allocator("longest_wait", longest_wait={"min_uncertainty": 0.1})
    assert isinstance(allocator.rule, LongestWaitRule)
    assert assigned(allocator.tick(robots.values(), ["op"])) == {"op": "r0"}
    with pytest.raises(ValueError, match="registered twice"):
        register_rule("longest_wait", LongestWaitConfig)(type("Other", (), {}))
