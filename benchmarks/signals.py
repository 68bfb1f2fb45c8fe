"""Which failure signal predicts that an episode will fail: AUROC and lead time, push and pick_place.

    python -m benchmarks.signals [--tasks push pick_place] [--train 20] [--calib 40] [--test 30]

For each task: collect scripted demos and train a small low-dim diffusion policy (cached under --out,
like benchmarks.policy_results), then roll it out with K sampled chunks per plan from three kinds of
start: normal (the training distribution), perturbed (random arm motion before the policy takes over)
and ood_goal (goals outside the box demos were collected in, near the table's edges). Three disjoint
seed ranges: --train rollouts per condition train the risk classifier and the LDM (the flow and RND
learn from the demos alone), --calib normal rollouts give the conformal thresholds (their successful
episodes are the nominal data), --test rollouts per condition are scored. The safety models are saved
into the checkpoint (safety.safetensors + safety.json), which benchmarks.safety_filter then uses.

Per signal (higher = more likely to fail): AUROC of the episode's highest score before its failure
(the violation, or the end of a failed episode) for "the episode fails", and (auroc_early) the same
over the first 30 steps only: failures run to the time limit while successes end early, so the
whole-episode maximum also rewards noticing that an episode is long; at the calibrated 5% episode
false-alarm rate (time-varying conformal thresholds): the share of failures caught, the false-alarm rate
achieved on the test successes, and the median lead time (steps from the first alarm to the failure).
Rollouts are cached (safetensors + JSON) in --out; delete them to roll out again.

--action-space delta trains the policy on the robot's own actions (end-effector steps) instead of target
positions: such a policy's z errors add up over an open-loop chunk and run the fingers into the table
(benchmarks/README.md, policy_results), which gives the safety filter violations to prevent. Give it
its own --out: the cached demos, checkpoint and rollouts are named by task and demo count only.

--safety-action-steps sets how many executed actions of a chunk the action-scoring models see
(SafetyConfig.action_steps). The rollouts cache each plan's candidates at that width, so another width
needs another --out; copy the demos store and the checkpoint folder (without safety.*) there to reuse
the policy: both are reused when their names, training steps and action space match.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from benchmarks.common import machine_line, print_table
from benchmarks.policy_results import demos_store, trained_checkpoint
from flotilla.cli import CONFIG_DIR
from policies.checkpoint import read_config
from policies.runner import PolicyRunner
from policies.safety.config import FILTER_FALSE_ALARM
from policies.safety.filter import FilterConfig
from policies.safety.fit import Rollout, calibrate, demo_data, fit_suite, rollout_scores
from policies.safety.models import SafetyConfig, load_safety
from policies.threads import set_torch_threads
from policies.train import train
from sim.tasks import make_env
from sim.tasks.panda_env import OBJECT_GOAL_XY

CONDITIONS = ("normal", "perturbed", "ood_goal")
SEED_BASE = {"train": 20_000, "calib": 30_000, "test": 40_000}
CONDITION_OFFSET = {"normal": 0, "perturbed": 1000, "ood_goal": 2000, "edge_goal": 3000}
PERTURB_STEPS = 6
# OOD goals lie in this box but outside the demos' goal box (OBJECT_GOAL_XY).
OOD_GOAL_BOX = (np.array([0.30, -0.33]), np.array([0.70, 0.33]))
PICK_PLACE_GOAL_Z = 0.02
# Edge goals (the filter benchmark's hardest condition): x beyond EDGE_INNER[0] or |y| beyond
# EDGE_INNER[1], up to a few cm past the table's edges (TABLE_X max 0.72, TABLE_Y +-0.40).
EDGE_GOAL_BAND = (np.array([0.40, -0.43]), np.array([0.76, 0.43]))
EDGE_INNER = (0.66, 0.30)
SIGNAL_NAMES = ("uncertainty", "novelty", "rnd", "risk", "ldm", "agree")
TARGET_FALSE_ALARM = 0.05
EARLY_STEPS = 30


# ============================================================================================ rollouts
def ood_goal(rng: np.random.Generator, goal_dim: int) -> np.ndarray:
    low, high = OBJECT_GOAL_XY
    while True:
        xy = rng.uniform(*OOD_GOAL_BOX)
        if not (np.all(xy >= low) and np.all(xy <= high)):
            return xy if goal_dim == 2 else np.r_[xy, PICK_PLACE_GOAL_Z]


def edge_goal(rng: np.random.Generator, goal_dim: int) -> np.ndarray:
    """A goal at or past the table's far or side edges: pushing there tends to push the object off."""
    low, high = EDGE_GOAL_BAND
    while True:
        xy = rng.uniform(low, high)
        if xy[0] >= EDGE_INNER[0] or abs(xy[1]) >= EDGE_INNER[1]:
            return xy if goal_dim == 2 else np.r_[xy, PICK_PLACE_GOAL_Z]


def start_episode(env, condition: str, seed: int):
    """Reset for `condition`; returns (obs, info, steps spent before the policy takes over)."""
    rng = np.random.default_rng(seed)
    for attempt in range(20):
        goal_for = {"ood_goal": ood_goal, "edge_goal": edge_goal}.get(condition)
        options = {"goal": goal_for(rng, env.goal_dim)} if goal_for else None
        try:
            obs, info = env.reset(seed=seed + 100_000 * attempt, options=options)
        except ValueError:  # no object start suits this goal: draw another
            continue
        if condition != "perturbed":
            return obs, info, 0
        direction = np.r_[rng.uniform(-1, 1, 2), rng.uniform(0, 0.6), -1.0].astype(np.float32)
        for _ in range(PERTURB_STEPS):
            obs, _, _, _, info = env.step(direction)
        if not info["constraint_violation"]:
            return obs, info, PERTURB_STEPS
    raise RuntimeError(f"no usable {condition} start for seed {seed}")


def rollout(env, runner: PolicyRunner, condition: str, seed: int) -> Rollout:
    obs, info, offset = start_episode(env, condition, seed)
    runner.reset()
    record, seen, t = Rollout(condition=condition), runner.safety.last, 0
    while True:
        action = runner.act(obs)
        plan = runner.safety.last
        if plan is not seen:  # a new plan was made for this step
            seen = plan
            record.plan_steps.append(t)
            record.states.append(plan.state.cpu())
            record.candidates.append(plan.candidates.cpu())
            record.choices.append(-1 if plan.choice is None else plan.choice)
            record.uncertainty.append(runner.uncertainty)
        obs, _, terminated, truncated, info = env.step(action)
        t += 1
        if info["constraint_violation"]:
            record.violation_step = t - 1
            break
        if terminated or truncated:
            break
    record.length, record.success = t, bool(info["success"])
    return record


def run_rollouts(
    checkpoint, task, condition, seeds, num_samples, safety_filter=None, action_steps=None
) -> list[Rollout]:
    """`action_steps`: the width the candidates are summarized at (None: the checkpoint's safety models'
    or SafetyConfig's); it must match the checkpoint's safety models if it has some."""
    runner = PolicyRunner.from_checkpoint(
        checkpoint, num_samples=num_samples, device="cpu", safety_filter=safety_filter or FilterConfig()
    )
    if action_steps is not None:
        if action_steps > runner.n_action_steps:
            raise SystemExit(
                f"{checkpoint}: action_steps {action_steps} exceeds the {runner.n_action_steps} steps it executes"
            )
        suite = runner.safety.suite
        if suite is not None and suite.config.action_steps != action_steps:
            raise SystemExit(
                f"{checkpoint}: its safety models see {suite.config.action_steps} action steps, not "
                f"{action_steps}: give --out another folder"
            )
        runner.safety.action_steps = action_steps
    env = make_env(task, seed=int(seeds[0]))
    try:
        return [rollout(env, runner, condition, int(seed)) for seed in seeds]
    finally:
        env.close()


def save_rollouts(path: Path, rollouts: list[Rollout]) -> None:
    tensors, meta = {}, []
    for i, r in enumerate(rollouts):
        tensors[f"{i}.states"] = torch.stack(r.states).contiguous()
        tensors[f"{i}.candidates"] = torch.stack(r.candidates).contiguous()
        meta.append(
            {
                key: getattr(r, key)
                for key in (
                    "plan_steps",
                    "choices",
                    "uncertainty",
                    "length",
                    "success",
                    "violation_step",
                    "condition",
                )
            }
        )
    save_file(tensors, f"{path}.safetensors")
    Path(f"{path}.json").write_text(json.dumps(meta))


def load_rollouts(path: Path) -> list[Rollout] | None:
    if not Path(f"{path}.json").exists():
        return None
    tensors = load_file(f"{path}.safetensors")
    return [
        Rollout(states=list(tensors[f"{i}.states"]), candidates=list(tensors[f"{i}.candidates"]), **fields)
        for i, fields in enumerate(json.loads(Path(f"{path}.json").read_text()))
    ]


def cached_rollouts(out: Path, name: str, make, width: int | None = None) -> list[Rollout]:
    """The rollouts cached as `name` in `out`, else `make()`'s (then cached); `width`: the candidate
    summaries' size they must have (a cache made at another action_steps is refused)."""
    path = out / f"rollouts_{name}"
    rollouts = load_rollouts(path)
    cached = rollouts[0].candidates[0].shape[-1] if rollouts and rollouts[0].candidates else None
    if width is not None and cached is not None and cached != width:
        raise SystemExit(
            f"{path}: cached candidates are {cached} wide, not {width} (another --safety-action-steps): "
            "give --out another folder"
        )
    if rollouts is None:
        started = time.perf_counter()
        rollouts = make()
        save_rollouts(path, rollouts)
        print(f"  {name}: {len(rollouts)} rollouts in {time.perf_counter() - started:.0f} s", flush=True)
    return rollouts


# ============================================================================================ metrics
def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (ties count half): P(score of a positive > score of a negative)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def until_failure(r: Rollout, per_step: np.ndarray) -> np.ndarray:
    """The scores a detector could have used: up to and including the failure step."""
    end = r.length if np.isinf(r.failure_step) else int(r.failure_step) + 1
    return per_step[: max(end, 1)]


def signal_row(name: str, rollouts: list[Rollout], scores: list[dict], threshold) -> dict:
    per_step = [until_failure(r, r.per_step(s[name])) for r, s in zip(rollouts, scores, strict=True)]
    failed = np.array([r.failed for r in rollouts])
    row = {"signal": name, "auroc": auroc([p.max() for p in per_step], failed)}
    # Failed episodes run to the time limit and successes end early, so a whole-episode maximum also
    # rewards "the episode is long"; the first EARLY_STEPS steps compare like with like.
    row["auroc_early"] = auroc([p[:EARLY_STEPS].max() for p in per_step], failed)
    alarms = [threshold.first_alarm(p) for p in per_step]
    caught = [
        (r.failure_step - a) for r, a in zip(rollouts, alarms, strict=True) if r.failed and a is not None
    ]
    row["caught"] = len(caught) / max(int(failed.sum()), 1)
    row["false_alarms"] = float(
        np.mean([a is not None for a, f in zip(alarms, failed, strict=True) if not f])
    )
    row["lead_steps"] = float(np.median(caught)) if caught else float("nan")
    return row


def plot_roc(task: str, rollouts: list[Rollout], scores: list[dict], folder: Path) -> Path:
    """ROC curves of every signal for episode failure (all test conditions together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    failed = np.array([r.failed for r in rollouts])
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for name in SIGNAL_NAMES:
        top = np.array(
            [until_failure(r, r.per_step(s[name])).max() for r, s in zip(rollouts, scores, strict=True)]
        )
        cuts = np.r_[np.inf, np.sort(np.unique(top))[::-1]]
        tpr = [(top[failed] >= c).mean() for c in cuts]
        fpr = [(top[~failed] >= c).mean() for c in cuts]
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(top, failed):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set(
        xlabel="false alarms (successful episodes)",
        ylabel="failures caught",
        title=f"{task}: episode failure",
    )
    ax.legend(fontsize=7, loc="lower right")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"signals_{task}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ============================================================================================ main
def prepare_checkpoint(out: Path, task: str, demos: int, steps: int, action_space: str = "target") -> Path:
    data = demos_store(out, task, demos, {})
    run_dir = out / f"{task}_{demos}_diffusion"
    checkpoint = trained_checkpoint(run_dir, steps, data)
    if checkpoint is not None:
        kind = read_config(checkpoint).get("action_space", {}).get("kind")
        if kind != action_space:
            raise SystemExit(
                f"{checkpoint} predicts {kind} actions, not {action_space}: give --out another folder"
            )
    if checkpoint is None:
        overrides = [
            f"task={task}",
            "policy=diffusion",
            f"data=[{data}]",
            f"out={run_dir}",
            f"steps={steps}",
            "threads=1",
            "progress=false",
            "tensorboard=false",
            f"action_space.kind={action_space}",
        ]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            checkpoint = train(compose(config_name="train", overrides=overrides))
    return checkpoint


def seeds(split: str, condition: str, count: int) -> np.ndarray:
    return SEED_BASE[split] + CONDITION_OFFSET[condition] + np.arange(count)


def evaluate_task(args, task: str) -> list[dict]:
    checkpoint = prepare_checkpoint(args.out, task, args.demos, args.steps, args.action_space)
    print(f"{task}: checkpoint {checkpoint}", flush=True)
    out = args.out / f"{task}_signals"
    out.mkdir(parents=True, exist_ok=True)
    K = args.num_samples
    cfg = SafetyConfig(**args.safety)
    width = cfg.action_steps * read_config(checkpoint)["shape_meta"]["action_dim"]
    roll = {}
    for split, conditions, count in (
        ("train", CONDITIONS, args.train),
        ("calib", ("normal",), args.calib),
        ("test", CONDITIONS, args.test),
    ):
        roll[split] = []
        for condition in conditions:
            roll[split] += cached_rollouts(
                out,
                f"{split}_{condition}",
                lambda c=condition, s=split, n=count: run_rollouts(
                    checkpoint, task, c, seeds(s, c, n), K, action_steps=cfg.action_steps
                ),
                width,
            )
    suite = load_safety(checkpoint) if args.reuse_safety else None
    if suite is not None and suite.config.action_steps != cfg.action_steps:
        raise SystemExit(
            f"{checkpoint}: its safety models see {suite.config.action_steps} action steps, not {cfg.action_steps}"
        )
    if suite is None:
        runner = PolicyRunner.from_checkpoint(checkpoint, device="cpu")
        started = time.perf_counter()
        demos = demo_data(runner.policy, checkpoint, cfg, num_samples=K)
        suite = fit_suite(runner.policy, demos, roll["train"], cfg)
        print(f"  safety models trained in {time.perf_counter() - started:.0f} s", flush=True)
    nominal = [r for r in roll["calib"] if r.success]
    calibrate(suite, nominal, TARGET_FALSE_ALARM, args.filter_false_alarm)
    suite.save(checkpoint)
    rows = []
    if args.figure:
        plot_roc(task, roll["test"], [rollout_scores(suite, r) for r in roll["test"]], args.figure)
    for condition in ("all", *CONDITIONS):
        test = [r for r in roll["test"] if condition in ("all", r.condition)]
        scores = [rollout_scores(suite, r) for r in test]
        failures = sum(r.failed for r in test)
        for name in SIGNAL_NAMES:
            row = signal_row(name, test, scores, suite.thresholds[name])
            rows.append(
                {"task": task, "condition": condition, "episodes": len(test), "failures": failures, **row}
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["push", "pick_place"])
    parser.add_argument("--demos", type=int, default=100)
    parser.add_argument("--steps", type=int, default=4000, help="policy training steps")
    parser.add_argument(
        "--action-space",
        default="target",
        choices=["target", "delta"],
        help="what the policy predicts: target positions or the robot's steps (see above)",
    )
    parser.add_argument("--train", type=int, default=20, help="rollouts per condition for risk and LDM")
    parser.add_argument("--calib", type=int, default=40, help="normal rollouts for calibration")
    parser.add_argument("--test", type=int, default=30, help="rollouts per condition scored")
    parser.add_argument("--num-samples", type=int, default=8, help="K candidate chunks per plan")
    parser.add_argument("--filter-false-alarm", type=float, default=FILTER_FALSE_ALARM)
    parser.add_argument("--safety", nargs="*", default=[], help="SafetyConfig overrides KEY=VALUE")
    parser.add_argument(
        "--safety-action-steps",
        type=int,
        default=SafetyConfig.action_steps,
        help="executed actions of a chunk the safety models see (its own --out: see above)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/safety"))
    parser.add_argument(
        "--reuse-safety",
        action="store_true",
        help="use the checkpoint's trained safety models (recalibrated)",
    )
    parser.add_argument(
        "--figure", type=Path, default=None, help="folder for ROC figures (signals_<task>.png)"
    )
    args = parser.parse_args()
    args.safety = {k: (float(v) if "." in v else int(v)) for k, v in (p.split("=", 1) for p in args.safety)}
    if args.safety.setdefault("action_steps", args.safety_action_steps) != args.safety_action_steps:
        raise SystemExit("benchmarks.signals: give action_steps with --safety-action-steps, not --safety")
    set_torch_threads(1)
    print(machine_line(), flush=True)
    rows = []
    for task in args.tasks:
        rows += evaluate_task(args, task)
        (args.out / "signals.json").write_text(json.dumps(rows, indent=2))
    headers = [
        "task",
        "condition",
        "episodes",
        "failures",
        "signal",
        "auroc",
        "auroc_early",
        "caught",
        "false_alarms",
        "lead_steps",
    ]
    print()
    print_table(headers, [[row[h] for h in headers] for row in rows])


if __name__ == "__main__":
    main()
