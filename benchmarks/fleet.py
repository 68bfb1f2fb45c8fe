"""Allocation rules compared in the fleet learning loop: budget-matched random, C.U.R. and Flotilla
(Fleet-DAgger's IFL benchmark on push).

    python -m benchmarks.fleet [--arms cur random_budget flotilla] [--seeds 0 1 2 3 4] [--override k=v ...]
    python -m benchmarks.fleet --reuse --arms random      # add an arm, reusing each seed's initial policy
    python -m benchmarks.fleet --report runs/bench_fleet/results.json     # table and plot again, no runs
    python -m benchmarks.fleet --report runs/bench_fleet/results.json --evaluate 100   # + held-out evals

Each seed s (the demo's seed 1000 * s: its demos, fleet episodes and training seed share nothing with
another's) collects scripted demos and trains the initial policy once (sim.demo.initial_policy); every
arm then starts from that same policy and runs `flotilla demo`'s loop (sim.demo.fleet_rounds: an
embedded server, the sim fleet, retraining between rounds) with its allocation settings. The operators,
robots, rounds, episodes per round, t_T and t_R are the same for all; what differs is whom the humans
go to and when they are asked. The arms:

- cur: C.U.R. as the IFL benchmark runs it (section 3 of issue 14): constraint, uncertainty, risk (the
  learned risk of the deployed policy's safety models); pre-emption after t_T; at most as many violating
  robots ranked as violations as there are operators (cv_thresh 1); both thresholds recalibrated within
  the round to the request rate alpha (ThriftyDAgger).
- random_budget: Fleet-DAgger's random baseline, budget-matched: each tick a random number of busy
  humans around C.U.R.'s share of robot-steps with a human in the same seed (run after cur).
- random: the always-busy random (every human on a random robot every tick), a costlier baseline.
- cur_no_preempt: C.U.R. as Flotilla ran it before (a human stays while the robot needs help, no cap).
- flotilla: Flotilla's rule ranking by the learned risk (allocation.flotilla.signal=risk), its threshold
  fixed each round from the deployed policy's held-out calibration rollouts (sim/round_thresholds.py),
  so requests fall as the policy improves.
- flotilla_uncertainty, flotilla_combined: the same, ranking by the sampling spread (as Flotilla did before
  the learned risk, and the rule's default since run (b)), or by both ("combined").

Every deployed policy carries safety models (sim/round_safety.py, `flotilla safety`'s fit: the flow
and the risk classifier, 1000 steps each): the seed's initial one learns from 16 pilot rollouts of its
own, each retrained one from the pilot and the fleet's episodes so far; so the robots report a learned
risk to the server. The random arms' retrained policies skip them (random reads no signal).

Reported per arm, mean +- std over seeds: ROHE over all rounds as Flotilla defines it ((M / N) *
autonomous successes / (1 + human action steps), sim/metrics.py) and as the IFL repository's plots
compute it (successes - 0.01 * human actions, every robot-step with a human counted, resets included),
the last round's autonomous success rate, human action steps, and with --evaluate the held-out success
of the initial and final policies. Then Flotilla against C.U.R.: the ROHE ratio and the difference in
standard errors. Writes results.json into --out, benchmarks/figures/fleet_allocation.png, and prints
the markdown table.

A round's success rate comes from the fleet's own episodes (16 at the defaults: +-12 points), with
humans cutting in. `--evaluate N` also runs every seed's initial policy and every run's final policy
(the last one deployed) alone on N held-out episodes (sim/evaluate.py, seeds 10000 on), which
says with less noise how much each allocation's human data improved the policy. Those results are
kept in results.json, so a later --report does not evaluate again.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from benchmarks.common import machine_line
from flotilla.cli import CONFIG_DIR
from policies.safety.models import load_safety
from policies.threads import set_torch_threads
from policies.train import final_checkpoint
from sim.demo import fleet_rounds, fresh_folder, initial_policy, initial_safety, version_dir
from sim.metrics import cumulative, table_header, table_row

# Run in this order: random_budget takes cur's budget.
ARMS = (
    "cur",
    "flotilla",
    "random_budget",
    "random",
    "cur_no_preempt",
    "flotilla_uncertainty",
    "flotilla_combined",
)
DEFAULT_ARMS = ("cur", "flotilla", "random_budget")
# The demo seeds its demos, fleet episodes and training from `seed` on: seeds this far apart share none.
SEED_STRIDE = 1000
LABELS = {
    "random": "random (always busy)",
    "random_budget": "random (budget-matched)",
    "cur": "C.U.R.",
    "cur_no_preempt": "C.U.R. without pre-emption",
    "flotilla": "Flotilla",
    "flotilla_uncertainty": "Flotilla ranking by uncertainty",
    "flotilla_combined": "Flotilla ranking by uncertainty and risk",
}
IFL_LAMBDA = 0.01  # the IFL repository's plots: successes - 0.01 * human actions
FIGURE = Path(__file__).resolve().parent / "figures" / "fleet_allocation.png"
# Overrides of configs/demo.yaml (the rest, e.g. hg_dagger weighting and the allocation settings, as the
# demo has them): push with a small diffusion model, sized so that 3 seeds x 3 rules finish within an
# hour on the project's 2-core machine (threads=1 everywhere). Push predicts target positions (with steps,
# z errors add up over a chunk into the table: benchmarks/README.md, policy_results). Training steps
# matter most (seed 0, 30 episodes each): 1500 steps gave 7% success on the demos alone and 0% with two
# rounds of C.U.R. fleet data; 4000 steps gave 20% on the demos and 40% with three rounds. Those were
# retrained from scratch; with the demo's warm_start (fine-tune the deployed policy, now the default)
# 3000 steps a round took held-out success from 33% to 70% (C.U.R., Flotilla; benchmarks/README.md).
DEFAULTS = [
    "task=push",
    "rounds=3",
    "demos.episodes=30",
    "demos.train_steps=3000",
    "train.steps=3000",
    "train.action_space.kind=target",
    "policy.down_dims=[16,32,64]",
    "fleet.episodes_per_robot=4",
    "fleet.control_hz=40",
    "threads=1",
    "train.threads=1",
    "progress=false",
    "train.progress=false",
    # The fleet steps in lockstep, each step as slow as the machine makes it; the server's wall-clock teleop
    # watchdog (0.12 s) would hold robots under an operator whenever the shared machine is busy.
    "+server.teleop_watchdog_s=30",
]


def demo_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="demo", overrides=overrides)


def arm_overrides(arm: str, seed: int, budget: float | None = None) -> list[str]:
    """The demo's overrides for an arm; `budget` (random_budget): C.U.R.'s share of robot-steps with a human."""
    rule = next(name for name in ("random", "cur", "flotilla") if arm.startswith(name))
    extra = [f"server.allocation.rule={rule}", f"server.allocation.seed={seed}"]
    if arm.startswith("flotilla"):
        # The learned risk (issue 14, section 4); flotilla_<signal>: another allocation.flotilla.signal.
        signal = arm.partition("_")[2] or "risk"
        extra.append(f"+server.allocation.flotilla.signal={signal}")
    else:
        extra.append("calibration.episodes=0")  # the baselines keep the rate-calibrated thresholds
        # ... also when a published checkpoint carries its own (the server would fix them: the lead's
        # allocation.policy_thresholds, fleet/server/policy_thresholds.py)
        extra.append("+server.allocation.policy_thresholds=false")
    if arm.startswith("random"):
        # Random reads no signal: its retrained policies need no safety models (the seed's initial one,
        # shared by every arm, has them). Without a filter they do not change what the policy does.
        extra.append("safety.fit=false")
    if arm == "cur":
        extra += ["+server.allocation.preempt=true", "+server.allocation.cur.violation_share=1.0"]
    elif arm == "random":
        extra.append("+server.allocation.random.scope=all")
    elif arm == "random_budget":
        if budget is None:
            raise SystemExit(
                "benchmarks.fleet: random_budget needs the seed's cur run first (--arms cur ...)"
            )
        extra += [
            "+server.allocation.preempt=true",
            "+server.allocation.random.scope=budget",
            f"+server.allocation.random.budget={budget:.6f}",
        ]
    return extra


def human_share(rounds: list[dict]) -> float:
    """Human action steps per robot-step over a run's rounds (random_budget's budget)."""
    return sum(r["human_action_steps"] for r in rounds) / max(sum(r["robot_steps"] for r in rounds), 1)


def rule_of(record: dict) -> str:
    """The arm of a run (results written before rules were named so call it "policy")."""
    return record.get("rule", record.get("policy", ""))


def show_round(tag: str, metrics) -> None:
    print(f"{tag}:", table_header(), table_row(metrics), sep="\n", flush=True)


def seed_policy(base: list[str], seed_dir: Path, reuse: bool) -> tuple[Path, Path, dict]:
    """The seed's demos and initial policy: trained afresh, or with `reuse` the ones already in seed_dir."""
    cfg = demo_config(base)
    demos, initial = seed_dir / "demos.zarr", version_dir(seed_dir, f"{cfg.task.name}-r0")
    if reuse and demos.exists() and initial.exists():
        print(f"reusing {demos} and {initial}", flush=True)
        checkpoint, timings = final_checkpoint(initial), {}
        if cfg.safety.fit and load_safety(checkpoint) is None:  # an initial policy from before safety models
            timings = initial_safety(cfg, checkpoint, demos)
        return demos, checkpoint, timings
    return initial_policy(cfg, fresh_folder(seed_dir, overwrite=True))


def run_benchmark(
    overrides: list[str], seeds: list[int], arms: list[str], out: Path, reuse: bool = False
) -> list[dict]:
    """Every (seed, arm) run's rounds, written to out/results.json as each run ends (with `reuse`, added
    to the runs already there, replacing those of the same seed and arm)."""
    results = out / "results.json"
    records: list[dict] = json.loads(results.read_text())["runs"] if reuse and results.exists() else []
    # The fleet's policies run at cfg.threads (1): more torch threads than free cores stall them, and with
    # --reuse no training has set the count yet.
    set_torch_threads(demo_config(overrides).threads)
    for seed in seeds:
        base = [*overrides, f"seed={SEED_STRIDE * seed}"]
        seed_dir = out / f"seed{seed}"
        demos, initial, timings = seed_policy(base, seed_dir, reuse)
        for arm in sorted(arms, key=ARMS.index):
            cur = [r for r in records if r["seed"] == seed and rule_of(r) == "cur"]
            budget = human_share(cur[-1]["rounds"]) if cur else None
            cfg = demo_config([*base, *arm_overrides(arm, seed, budget)])
            started = time.monotonic()
            rounds, more = fleet_rounds(
                cfg,
                fresh_folder(seed_dir / arm, overwrite=True),
                demos,
                initial,
                on_round=functools.partial(show_round, f"seed {seed} {arm}"),
            )
            records = [r for r in records if (r["seed"], rule_of(r)) != (seed, arm)]
            records.append(
                {
                    "seed": seed,
                    "rule": arm,
                    "budget": budget if arm == "random_budget" else None,
                    "rounds": [m.to_dict() for m in rounds],
                    "timings": {**timings, **more, "wall_s": time.monotonic() - started},
                }
            )
            results.write_text(json.dumps({"overrides": overrides, "runs": records}, indent=2))
    return records


def deployed_checkpoint(out: Path, record: dict, round_index: int) -> Path:
    """The checkpoint the fleet ran in a round: <task>-r0 is the seed's initial policy (shared by all
    allocation rules); later versions were trained in the run's own folder (sim.demo.fleet_rounds)."""
    version = record["rounds"][round_index]["policy_version"]
    seed_dir = out / f"seed{record['seed']}"
    demo_dir = seed_dir if version.endswith("-r0") else seed_dir / rule_of(record)
    return final_checkpoint(version_dir(demo_dir, version))


def evaluate_runs(records: list[dict], out: Path, episodes: int, task: str, max_steps: int) -> None:
    """Held-out success of each run's initial and final policy (record["eval"]); evaluated once each."""
    from sim.evaluate import evaluate

    cache: dict[Path, float] = {}
    for record in records:
        if record.get("eval", {}).get("episodes") == episodes:
            continue
        results = {}
        for name, index in (("initial", 0), ("final", -1)):
            checkpoint = deployed_checkpoint(out, record, index)
            if checkpoint not in cache:
                cache[checkpoint] = evaluate(checkpoint, task, episodes, max_steps=max_steps, progress=False)[
                    "success_rate"
                ]
            results[name] = cache[checkpoint]
        record["eval"] = {"episodes": episodes, **results}
        print(
            f"seed {record['seed']} {rule_of(record)}: held-out success {results['initial']:.0%} initial -> "
            f"{results['final']:.0%} final ({episodes} episodes)",
            flush=True,
        )


def run_totals(rounds: list[dict]) -> dict:
    """One run's benchmark numbers from its rounds."""
    totals = cumulative(rounds)
    return {
        "rohe": totals["rohe"],
        "ifl_rohe": totals["successes"] - IFL_LAMBDA * totals["human_action_steps"],
        "final_success": totals["final_autonomous_success_rate"],
        "human_steps": totals["human_action_steps"],
        "interventions": totals["interventions"],
        "hard_resets": totals["hard_resets"],
    }


def summary_table(records: list[dict]) -> str:
    columns = [
        ("ROHE (all rounds)", "rohe", "{:.4f}"),
        ("IFL ROHE (succ. - 0.01 x human)", "ifl_rohe", "{:.1f}"),
        ("final auto success", "final_success", "{:.0%}"),
        ("human action steps", "human_steps", "{:.0f}"),
        ("interventions", "interventions", "{:.0f}"),
        ("hard resets", "hard_resets", "{:.1f}"),
    ]
    if records and all("eval" in record for record in records):
        episodes = records[0]["eval"]["episodes"]
        columns += [
            (f"held-out success, initial ({episodes} eps)", "eval_initial", "{:.0%}"),
            (f"held-out success, final ({episodes} eps)", "eval_final", "{:.0%}"),
        ]
    lines = [
        "| allocation | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for rule in dict.fromkeys(rule_of(record) for record in records):
        totals = [
            {
                **run_totals(record["rounds"]),
                **{f"eval_{name}": value for name, value in record.get("eval", {}).items()},
            }
            for record in records
            if rule_of(record) == rule
        ]
        cells = []
        for _, key, spec in columns:
            values = np.array([t[key] for t in totals], float)
            cells.append(f"{spec.format(values.mean())} +- {spec.format(values.std())}")
        lines.append(f"| {LABELS.get(rule, rule)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(records: list[dict], arm: str, baseline: str) -> str:
    """`arm` against `baseline` on ROHE: the ratio of means, and the difference in standard errors, both
    unpaired (the difference of means over sqrt(se_a^2 + se_b^2)) and paired by seed (the seeds share
    their initial policy)."""
    values = {
        name: {r["seed"]: run_totals(r["rounds"])["rohe"] for r in records if rule_of(r) == name}
        for name in (arm, baseline)
    }
    seeds = sorted(set(values[arm]) & set(values[baseline]))
    if len(seeds) < 2:
        return f"{arm} vs {baseline}: fewer than 2 seeds with both"
    a = np.array([values[arm][s] for s in seeds])
    b = np.array([values[baseline][s] for s in seeds])
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    diff = a - b
    paired_se = diff.std(ddof=1) / np.sqrt(diff.size)
    return (
        f"{LABELS.get(arm, arm)} vs {LABELS.get(baseline, baseline)} over seeds {seeds}: ROHE ratio "
        f"{a.mean() / b.mean():.2f}x, difference {diff.mean():+.4f} = {diff.mean() / se:.1f} standard errors "
        f"(unpaired), {diff.mean() / paired_se:.1f} (paired by seed)"
    )


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("autonomous success rate", "autonomous_success_rate"),
        ("human action steps", "human_action_steps"),
        ("ROHE", "rohe"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 3.6), constrained_layout=True)
    for rule in dict.fromkeys(rule_of(record) for record in records):
        runs = [record["rounds"] for record in records if rule_of(record) == rule]
        rounds = min(len(run) for run in runs)
        x = np.arange(1, rounds + 1)
        for axis, (title, key) in zip(axes, panels, strict=True):
            values = np.array([[r[key] for r in run[:rounds]] for run in runs], float)
            mean, std = values.mean(axis=0), values.std(axis=0)
            axis.plot(x, mean, marker="o", label=LABELS.get(rule, rule))
            axis.fill_between(x, mean - std, mean + std, alpha=0.2)
            axis.set_title(title)
            axis.set_xlabel("round")
            axis.set_xticks(x)
            axis.grid(alpha=0.3)
    axes[0].legend()
    seeds = len({record["seed"] for record in records})
    figure.suptitle(f"allocation rules in the fleet loop (mean +- std over {seeds} seeds)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse each seed's initial policy and the runs already in --out (replacing same seed and arm)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fleet"))
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument(
        "--override", nargs="*", default=[], help="hydra overrides of configs/demo.yaml, after ours"
    )
    parser.add_argument("--report", type=Path, help="only print the table and plot from this results.json")
    parser.add_argument(
        "--evaluate",
        type=int,
        default=0,
        metavar="N",
        help="also evaluate each run's initial and final policy on N held-out episodes",
    )
    args = parser.parse_args()
    print(machine_line(), flush=True)
    if args.report:
        results_path = args.report
        results = json.loads(results_path.read_text())
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        records = run_benchmark([*DEFAULTS, *args.override], args.seeds, args.arms, args.out, args.reuse)
        print(f"benchmark done in {time.monotonic() - started:.0f} s; runs in {args.out}")
        results_path = args.out / "results.json"
        results = {"overrides": [*DEFAULTS, *args.override], "runs": records}
    records = results["runs"]
    if args.evaluate:
        cfg = demo_config(results["overrides"])
        set_torch_threads(cfg.threads)
        evaluate_runs(records, results_path.parent, args.evaluate, cfg.task.name, cfg.task.max_steps)
        results_path.write_text(json.dumps(results, indent=2))
    plot(records, args.figure)
    print(summary_table(records))
    print(comparison(records, "flotilla", "cur"))
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
