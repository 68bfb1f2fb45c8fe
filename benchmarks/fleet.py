"""Allocation rules compared in the fleet learning loop: random, C.U.R. and Flotilla (Fleet-DAgger's IFL
benchmark on push).

    python -m benchmarks.fleet [--rules random cur flotilla] [--seeds 0 1 2] [--override key=value ...]
    python -m benchmarks.fleet --report runs/bench_fleet/results.json     # table and plot again, no runs
    python -m benchmarks.fleet --report runs/bench_fleet/results.json --evaluate 100   # + held-out evals

Each seed s (the demo's seed 1000 * s: its demos, fleet episodes and training seed share nothing with
another's) collects scripted demos and trains the initial policy once (sim.demo.initial_policy); every
allocation rule then starts from that same policy and runs `flotilla demo`'s loop (sim.demo.fleet_rounds:
an embedded server, the sim fleet, retraining between rounds) with `server.allocation.rule` set to it.
The human budget is the same for all: the same operators, robots, rounds and episodes per round (and the
same t_T, t_R and request rate alpha); what differs is whom the humans go to. The random baseline is
Fleet-DAgger's: humans go to random robots, whether they ask for help or not (random.scope=all).

Reported per rule, mean +- std over seeds: ROHE over all rounds ((M / N) * autonomous successes /
(1 + human action steps), sim/metrics.py), the last round's autonomous success rate, and human action
steps over all rounds. Writes results.json into --out, benchmarks/figures/fleet_allocation.png, and
prints the markdown table.

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
from policies.threads import set_torch_threads
from policies.train import final_checkpoint
from sim.demo import fleet_rounds, fresh_folder, initial_policy, version_dir
from sim.metrics import cumulative, table_header, table_row

RULES = ("random", "cur", "flotilla")
# The demo seeds its demos, fleet episodes and training from `seed` on: seeds this far apart share none.
SEED_STRIDE = 1000
LABELS = {"random": "random", "cur": "C.U.R.", "flotilla": "Flotilla"}
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
]


def demo_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="demo", overrides=overrides)


def rule_overrides(rule: str, seed: int) -> list[str]:
    extra = [f"server.allocation.rule={rule}", f"server.allocation.seed={seed}"]
    if rule == "random":
        extra.append("+server.allocation.random.scope=all")
    return extra


def rule_of(record: dict) -> str:
    """The allocation rule of a run (results written before rules were named so call it "policy")."""
    return record.get("rule", record.get("policy", ""))


def show_round(tag: str, metrics) -> None:
    print(f"{tag}:", table_header(), table_row(metrics), sep="\n", flush=True)


def run_benchmark(overrides: list[str], seeds: list[int], rules: list[str], out: Path) -> list[dict]:
    """Every (seed, rule) run's rounds, written to out/results.json as each run ends."""
    records: list[dict] = []
    for seed in seeds:
        base = [*overrides, f"seed={SEED_STRIDE * seed}"]
        seed_dir = fresh_folder(out / f"seed{seed}", overwrite=True)
        demos, initial, timings = initial_policy(demo_config(base), seed_dir)
        for rule in rules:
            cfg = demo_config([*base, *rule_overrides(rule, seed)])
            started = time.monotonic()
            rounds, more = fleet_rounds(
                cfg,
                fresh_folder(seed_dir / rule, overwrite=True),
                demos,
                initial,
                on_round=functools.partial(show_round, f"seed {seed} {rule}"),
            )
            records.append(
                {
                    "seed": seed,
                    "rule": rule,
                    "rounds": [m.to_dict() for m in rounds],
                    "timings": {**timings, **more, "wall_s": time.monotonic() - started},
                }
            )
            (out / "results.json").write_text(json.dumps({"overrides": overrides, "runs": records}, indent=2))
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
        "final_success": totals["final_autonomous_success_rate"],
        "human_steps": totals["human_action_steps"],
        "interventions": totals["interventions"],
        "hard_resets": totals["hard_resets"],
    }


def summary_table(records: list[dict]) -> str:
    columns = [
        ("ROHE (all rounds)", "rohe", "{:.4f}"),
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
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
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
        records = run_benchmark([*DEFAULTS, *args.override], args.seeds, args.rules, args.out)
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
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
