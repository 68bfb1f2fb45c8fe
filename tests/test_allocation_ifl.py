"""The allocation baselines behave as the IFL benchmark's own allocation code (Fleet-DAgger): pre-emption
after t_T, C.U.R.'s warmup and cap on violating robots, any order of its categories, and the random
baseline matched to C.U.R.'s human budget."""

import numpy as np
import pytest

from fleet.allocation import PREEMPTED, RESET_DONE, Signals, make_allocator
from tests.test_allocation import FIXED, assigned, fleet, serve_order, signal


def first_served(preempt: bool, t_T: int = 5, ticks: int = 30) -> tuple[int, list]:
    """The issue's minimal trace: one operator helps an uncertain robot that keeps needing help; at tick
    2 another robot violates a constraint. Returns the tick the violating robot gets the human and the
    releases up to then."""
    robots = fleet(2)
    signal(robots, "r0", uncertainty=0.9)
    allocator = make_allocator("cur", t_T=t_T, t_R=3, preempt=preempt, **FIXED)
    assert assigned(allocator.tick(robots.values(), ["op"])) == {"op": "r0"}
    signal(robots, "r1", violation=True)
    releases = []
    for tick in range(2, ticks + 1):
        if tick == 12:
            signal(robots, "r0", uncertainty=0.1)  # the helped robot stops needing help at last
        decisions = allocator.tick(robots.values(), ["op"])
        releases += [(r.robot_id, r.reason) for r in decisions.releases]
        if assigned(decisions).get("op") == "r1":
            return tick, releases
    raise AssertionError("the violating robot was never served")


def test_with_preemption_a_violating_robot_is_served_at_t_T():
    # The operator took r0 at tick 1; at tick 1 + t_T it has served t_T and moves to the blocked robot.
    tick, releases = first_served(preempt=True, t_T=5)
    assert tick == 6
    assert releases == [("r0", PREEMPTED)]


def test_without_preemption_it_waits_until_the_helped_robot_is_done():
    tick, releases = first_served(preempt=False, t_T=5)
    assert tick == 12  # blocked for 10 ticks: until r0 stopped needing help
    assert releases == [("r0", "no_longer_needed")]


def test_preemption_keeps_a_human_on_a_robot_that_ranks_higher():
    robots = fleet(2)
    signal(robots, "r0", uncertainty=0.9)
    allocator = make_allocator("cur", t_T=2, preempt=True, **FIXED)
    allocator.tick(robots.values(), ["op"])
    signal(robots, "r1", uncertainty=0.6)  # waits, but ranks below the robot the human holds
    for _ in range(6):
        decisions = allocator.tick(robots.values(), ["op"])
        assert decisions.releases == [] and decisions.assignments == []
    assert robots["r0"].controller == "op" and robots["r1"].waited_ticks == 6


def test_preemption_never_interrupts_a_reset():
    robots = fleet(2)
    signal(robots, "r0", violation=True)
    allocator = make_allocator("cur", t_T=1, t_R=6, preempt=True, **FIXED)
    allocator.tick(robots.values(), ["op"])
    signal(robots, "r1", violation=True)  # ranks level with r0 and has waited longer, soon
    releases = []
    for _ in range(6):
        releases += [(r.robot_id, r.reason) for r in allocator.tick(robots.values(), ["op"]).releases]
    assert releases == [("r0", RESET_DONE)]


def violators_served(settings: dict, ticks: int) -> list[tuple[int, str]]:
    """Three blocked robots and an uncertain one, two operators, resets of 3 ticks: (tick, robot) of every
    assignment."""
    robots = fleet(4)
    for robot_id in ("r0", "r1", "r2"):
        signal(robots, robot_id, violation=True)
    signal(robots, "r3", uncertainty=0.9)
    allocator = make_allocator("cur", t_T=50, t_R=3, **FIXED, cur=settings)
    served = []
    for tick in range(1, ticks + 1):
        served += [(tick, a.robot_id) for a in allocator.tick(robots.values(), ["a", "b"]).assignments]
    return served


def test_warmup_penalty_gives_violating_robots_no_help_at_first():
    served = violators_served({"warmup_penalty": 4}, ticks=6)
    # During the 4 warmup ticks only the uncertain robot gets a human; the violating robots wait.
    assert served[0] == (1, "r3")
    assert all(robot == "r3" for tick, robot in served if tick <= 4)
    assert (5, "r0") in served  # right after the warmup the free operator resets one
    assert violators_served({}, ticks=1) == [(1, "r0"), (1, "r1")]  # no warmup: violations first


def test_violation_share_caps_the_humans_sent_to_violating_robots():
    # Half of two operators: one violating robot ranks as a violation, the other human goes by signals.
    assert violators_served({"violation_share": 0.5}, ticks=1) == [(1, "r0"), (1, "r3")]
    assert violators_served({"violation_share": 1.0}, ticks=1) == [(1, "r0"), (1, "r1")]
    # Capped violating robots rank by their other signals: with none they get no human at all.
    assert violators_served({"violation_share": 0.0}, ticks=1) == [(1, "r3")]


@pytest.mark.parametrize(
    ("order", "served"),
    [
        ("cur", ["r2", "r3", "r0", "r1"]),
        ("cru", ["r2", "r1", "r3", "r0"]),
        ("ucr", ["r3", "r0", "r2", "r1"]),
        ("urc", ["r3", "r0", "r1", "r2"]),
        ("rcu", ["r1", "r2", "r3", "r0"]),
        ("ruc", ["r1", "r3", "r0", "r2"]),
        ("uc", ["r3", "r0", "r2"]),  # Fleet-EnsembleDAgger: risk is never asked about
        ("cu", ["r2", "r3", "r0"]),
        ("c", ["r2"]),  # the BC baseline: humans only reset violating robots
        ("U", ["r3", "r0"]),
    ],
)
def test_cur_orders_are_full_permutations_and_subsets(order, served):
    assert serve_order(order) == served


def human_share(rule: str, seed: int, ticks: int = 3000, **settings) -> float:
    """Share of robot-steps with a human on a synthetic fleet: 8 robots, 3 operators, signals drawn per
    tick (a robot violates with probability 0.005 and stays blocked until a human resets it)."""
    rng = np.random.default_rng(seed)
    robots = fleet(8)
    allocator = make_allocator(rule, t_T=5, t_R=5, seed=seed, **FIXED, **settings)
    with_human = 0
    for _ in range(ticks):
        for robot in robots.values():
            blocked = robot.signals.constraint_violation or rng.random() < 0.005
            robot.signals = Signals(float(rng.random() ** 12), float(rng.random() ** 20), 0.0, blocked)
        allocator.tick(robots.values(), ["a", "b", "c"])
        with_human += sum(robot.controller is not None for robot in robots.values())
    return with_human / (ticks * len(robots))


def test_budget_matched_random_spends_cur_s_human_budget():
    cur = human_share("cur", seed=1, preempt=True)
    always_busy = human_share("random", seed=1, random={"scope": "all"})
    matched = human_share("random", seed=1, preempt=True, random={"scope": "budget", "budget": cur})
    assert always_busy == pytest.approx(3 / 8, abs=0.01)  # every human busy every tick
    assert cur < 0.8 * always_busy  # C.U.R. leaves humans free when nobody needs them
    assert matched == pytest.approx(cur, rel=0.1)
