"""Task success of mlp, diffusion and gc_diffusion trained on scripted demos (the policy results table).

    python -m benchmarks.policy_results [--tasks push pick_place] [--demos 50 200] [--steps 3000]
        [--policy-steps mlp=3000 diffusion=12000] [--operator approach=around] [--reuse]

For each task and demo count: collect demos with the scripted expert (seeds 0..n-1), train each
policy with `flotilla train`'s code and config (any extra hydra override via --override), and
evaluate it with `flotilla eval`'s code on --eval-episodes episodes from seed 10000 on. Prints one
row per run as it finishes and writes results.json and results.md into --out. With --reuse, a run whose
folder already holds a checkpoint trained for the requested steps on the same demos is evaluated again
without retraining (e.g. to evaluate on more episodes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from benchmarks.common import machine_line, print_table
from fleet.store import EpisodeStore
from flotilla.cli import CONFIG_DIR
from policies.threads import set_torch_threads
from policies.train import final_checkpoint, train
from sim.collect import collect_demos
from sim.evaluate import evaluate

HEADERS = [
    "task",
    "demos",
    "policy",
    "train steps",
    "success",
    "mean length",
    "violations",
    "train s",
    "eval episodes",
]


def demos_store(out: Path, task: str, count: int, operator: dict) -> Path:
    path = out / f"{task}_{count}_demos.zarr"
    if not (path / "zarr.json").exists():
        with EpisodeStore.create(path, overwrite=True) as store:
            collect_demos(store, task, count, seed=0, operator_kwargs=operator, progress=False)
    return path


def trained_checkpoint(run_dir: Path, steps: int, data: Path) -> Path | None:
    """The run's checkpoint if it was trained for `steps` on the store `data`, else None."""
    config_path = final_checkpoint(run_dir) / "config.json"
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    stores = [Path(store).name for store in config.get("training", {}).get("stores", [])]
    return config_path.parent if config.get("step") == steps and stores == [data.name] else None


def parse_policy_steps(pairs: list[str], policies: list[str], default: int) -> dict[str, int]:
    """POLICY=STEPS pairs (e.g. mlp=3000 diffusion=12000); policies not named train for `default`."""
    steps = dict.fromkeys(policies, default)
    for pair in pairs:
        kind, sep, value = pair.partition("=")
        if not sep or not value.isdigit() or int(value) <= 0:
            raise SystemExit(f"--policy-steps wants POLICY=STEPS with a positive integer, got {pair!r}")
        if kind not in steps:
            raise SystemExit(f"--policy-steps names {kind!r}, which is not among --policies {policies}")
        steps[kind] = int(value)
    return steps


def parse_operator(pairs: list[str]) -> dict:
    """KEY=VALUE pairs for the scripted expert (numbers parsed, e.g. approach=around action_noise=0.05)."""
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--operator wants KEY=VALUE pairs, got {pair!r}")
        try:
            kwargs[key] = float(value) if "." in value else int(value)
        except ValueError:
            kwargs[key] = value
    return kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["push", "pick_place"])
    parser.add_argument("--demos", nargs="+", type=int, default=[50, 200])
    parser.add_argument("--policies", nargs="+", default=["mlp", "diffusion", "gc_diffusion"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument(
        "--policy-steps",
        nargs="*",
        default=[],
        help="training steps per policy, e.g. mlp=3000 diffusion=12000 (default --steps)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate existing checkpoints trained for the same steps instead of retraining",
    )
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/policy_results"))
    parser.add_argument(
        "--operator",
        nargs="*",
        default=[],
        help="scripted expert knobs for the demos, e.g. approach=around (push)",
    )
    parser.add_argument(
        "--override", nargs="*", default=[], help="extra hydra overrides for every training run"
    )
    args = parser.parse_args()
    steps_for = parse_policy_steps(args.policy_steps, args.policies, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine_line(), flush=True)
    rows, records = [], []
    for task in args.tasks:
        for count in args.demos:
            data = demos_store(args.out, task, count, parse_operator(args.operator))
            for kind in args.policies:
                run_dir, steps = args.out / f"{task}_{count}_{kind}", steps_for[kind]
                overrides = [
                    f"task={task}",
                    f"policy={kind}",
                    f"data={data}",
                    f"out={run_dir}",
                    f"steps={steps}",
                    "progress=false",
                    *args.override,
                ]
                with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                    cfg = compose(config_name="train", overrides=overrides)
                set_torch_threads(cfg.threads)  # train() sets it too; a reused checkpoint skips train()
                checkpoint = trained_checkpoint(run_dir, steps, data) if args.reuse else None
                train_s = None  # not trained in this run (reused)
                if checkpoint is None:
                    started = time.perf_counter()
                    checkpoint = train(cfg)
                    train_s = time.perf_counter() - started
                result = evaluate(
                    checkpoint, task, args.eval_episodes, max_steps=cfg.task.max_steps, progress=False
                )
                row = [
                    task,
                    count,
                    kind,
                    steps,
                    f"{100 * result['success_rate']:.0f}%",
                    result["mean_episode_length"],
                    result["constraint_violations"],
                    "reused" if train_s is None else train_s,
                    args.eval_episodes,
                ]
                rows.append(row)
                records.append(
                    {**result, "demos": count, "policy": kind, "train_seconds": train_s, "train_steps": steps}
                )
                print(" | ".join(str(v) for v in row), flush=True)
                (args.out / "results.json").write_text(json.dumps(records, indent=2))
    print()
    print_table(HEADERS, rows)


if __name__ == "__main__":
    main()
