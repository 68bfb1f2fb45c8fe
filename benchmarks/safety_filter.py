"""The safety filter from perturbed starts and out-of-distribution goals: violations and success.

    python -m benchmarks.safety_filter [--tasks push] [--episodes 40] [--filter-false-alarm 0.05]
    python -m benchmarks.safety_filter --out runs/safety_delta --demos 30 --conditions normal perturbed ood_goal

Run after benchmarks.signals, which trains the policy and its safety models into the checkpoint and
caches the calibration rollouts. Each mode rolls the same seeds out (K = --num-samples candidates per
plan): `off` (no filter: the policy's first sample), `density` (a single-step density filter: of the
candidates with novelty -log p(s, a) under its bound, the lowest, or with --choose first the first)
and `ldm` (the same with G(s, a)). Bounds are calibrated on the nominal calibration rollouts so that the
executed chunk of a nominal plan is refused at the --filter-false-alarm rate. A plan with no candidate
under the bound holds the robot for Ta steps (no human comes here: the episode goes on and it plans
again). Reported per mode and condition: success and constraint violations per 100 episodes, each with
its binomial standard error (sqrt(p (1 - p) / n)), the share of plans held, mean episode length.

Conditions (benchmarks.signals.start_episode) and their fixed test seeds, disjoint from the seeds the
safety models were trained (20000 on) and calibrated (30000 on) on: normal starts 50000 + i, perturbed
starts (6 steps of random arm motion first) 51000 + i, out-of-distribution goals 52000 + i. With
`--out` the folder benchmarks.signals wrote (e.g. `--out runs/safety_delta --demos 30` for its
delta-action run, whose policy runs the fingers into the table: the condition with violations).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, print_table
from benchmarks.signals import cached_rollouts, load_rollouts, run_rollouts
from policies.safety.config import FILTER_FALSE_ALARM
from policies.safety.filter import MODE_SIGNAL, FilterConfig
from policies.safety.fit import calibrate
from policies.safety.models import load_safety
from policies.threads import set_torch_threads
from policies.train import final_checkpoint

CONDITIONS = ("normal", "perturbed", "ood_goal")
DEFAULT_CONDITIONS = ("perturbed", "ood_goal")
MODES = ("off", "density", "ldm")
SEED_BASE = {"normal": 50_000, "perturbed": 51_000, "ood_goal": 52_000}
HEADERS = [
    "task",
    "condition",
    "filter",
    "bound",
    "episodes",
    "success",
    "success_se",
    "violations_per_100",
    "violations_se",
    "held",
    "length",
]


def binomial_se(p: float, n: int) -> float:
    return float(np.sqrt(p * (1 - p) / max(n, 1)))


def summary(rollouts) -> dict:
    plans = [c for r in rollouts for c in r.choices]
    n = len(rollouts)
    success = float(np.mean([r.success for r in rollouts]))
    violations = float(np.mean([r.violation_step is not None for r in rollouts]))
    return {
        "episodes": n,
        "success": success,
        "success_se": binomial_se(success, n),
        "violations_per_100": 100.0 * violations,
        "violations_se": 100.0 * binomial_se(violations, n),
        "held": float(np.mean([c < 0 for c in plans])) if plans else 0.0,
        "length": float(np.mean([r.length for r in rollouts])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["push"])
    parser.add_argument("--demos", type=int, default=100)
    parser.add_argument("--episodes", type=int, default=40, help="per condition and mode")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--filter-false-alarm", type=float, default=FILTER_FALSE_ALARM)
    parser.add_argument("--choose", default=FilterConfig.choose, choices=["first", "lowest"])
    parser.add_argument("--conditions", nargs="+", default=list(DEFAULT_CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=Path("runs/safety"))
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="shift every condition's test seeds (a fresh set, e.g. to confirm a choice made on the first)",
    )
    args = parser.parse_args()
    if (
        args.seed_offset < 0 or args.seed_offset + args.episodes > 1000
    ):  # the conditions' seeds are 1000 apart
        raise SystemExit("benchmarks.safety_filter: --seed-offset + --episodes must stay within 0..1000")
    set_torch_threads(1)
    print(machine_line(), flush=True)
    rows = []
    for task in args.tasks:
        checkpoint = final_checkpoint(args.out / f"{task}_{args.demos}_diffusion")
        suite = load_safety(checkpoint)
        signals_dir = args.out / f"{task}_signals"
        calib = load_rollouts(signals_dir / "rollouts_calib_normal")
        if suite is None or calib is None:
            raise SystemExit(f"{checkpoint}: run `python -m benchmarks.signals --tasks {task}` first")
        calibrate(suite, [r for r in calib if r.success], filter_false_alarm=args.filter_false_alarm)
        out = args.out / f"{task}_filter"
        out.mkdir(parents=True, exist_ok=True)
        for condition in args.conditions:
            seeds = SEED_BASE[condition] + args.seed_offset + np.arange(args.episodes)
            for mode in args.modes:
                bound = None if mode == "off" else suite.filter_thresholds[MODE_SIGNAL[mode]]
                config = FilterConfig(mode=mode, threshold=bound, choose=args.choose)
                name = f"{condition}_{mode}_{args.choose}_fa{100 * args.filter_false_alarm:g}pct_n{args.episodes}"
                name += f"_seeds+{args.seed_offset}" if args.seed_offset else ""
                rollouts = cached_rollouts(
                    out,
                    name,
                    lambda ck=checkpoint, t=task, c=condition, s=seeds, f=config: run_rollouts(
                        ck, t, c, s, args.num_samples, f
                    ),
                )
                row = {
                    "task": task,
                    "condition": condition,
                    "filter": mode,
                    "bound": bound,
                    **summary(rollouts),
                }
                rows.append(row)
                print(" | ".join(str(row[h]) for h in HEADERS), flush=True)
        suffix = f"_seeds+{args.seed_offset}" if args.seed_offset else ""
        (args.out / f"safety_filter{suffix}.json").write_text(json.dumps(rows, indent=2))
    print()
    print_table(HEADERS, [[row[h] if row[h] is not None else "-" for h in HEADERS] for row in rows])


if __name__ == "__main__":
    main()
