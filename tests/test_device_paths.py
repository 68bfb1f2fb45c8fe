"""The CUDA-only paths driven on the CPU: what would break the first time they run on a GPU.

No GPU here, so the checks use what a CPU can show:
- torch's ``meta`` device stands in for "another device than the CPU": a meta tensor has no data, so
  ``.item()``, ``.cpu()``/``.numpy()``, a Python branch on a tensor's value and an op mixing it with a
  non-scalar CPU tensor all raise, exactly the things CUDA graph capture (and a sync-free training step)
  cannot have; a ``TorchDispatchMode`` also records every host-to-device copy;
- torchrun's environment (WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_RANK) is set by hand;
- bf16 runs through CPU autocast.
"""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from configs.schema import ConfigError
from policies.data.batches import DeviceBatches, DeviceSteps
from policies.data.windows import WindowDataset
from policies.device import DeviceError, process_device, resolve_precision
from policies.models.factory import ShapeMeta
from policies.runner import PolicyRunner
from policies.safety.models import load_safety, policy_features
from tests.test_device import META, D, fitted, observation, windows, write_store
from tests.test_safety_filter import ACTION_DIM, ACTION_STEPS, STATE_DIM, safe_checkpoint  # noqa: F401
from tests.test_safety_train import stores  # noqa: F401

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- torchrun


def test_torchrun_processes_take_one_gpu_each_and_a_shared_cuda_index_is_refused():
    node = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "3"}
    for name in ("cuda:0", "cuda:1"):  # NCCL refuses two ranks on one GPU: say so before anything starts
        with pytest.raises(DeviceError, match=rf"^device: {name} would put all 2 processes .* LOCAL_RANK"):
            process_device(name, node)
    assert process_device("cpu", node) == CPU  # gloo on the CPU, as before
    alone = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # one process per machine
    if torch.cuda.device_count() >= 2:
        assert process_device("auto", node) == process_device("cuda", node) == torch.device("cuda", 1)
        assert process_device("cuda:1", alone) == torch.device("cuda", 1)
    elif not torch.cuda.is_available():
        assert process_device("auto", node) == CPU
        with pytest.raises(DeviceError, match="^device: cuda:1 requested but"):
            process_device("cuda:1", alone)  # a machine's own GPU may be named: only CUDA is missing
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N"):
        process_device("gpu", node)


def test_flotilla_train_under_torchrun_with_one_cuda_index_is_a_one_line_error(tmp_path, monkeypatch):
    from tests.test_cli import flotilla

    write_store(tmp_path / "a.zarr", [[D] * 30])
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    result = flotilla(
        "train", f"data={tmp_path / 'a.zarr'}", f"out={tmp_path / 'run'}", "device=cuda:0", check=False
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("flotilla train: device: cuda:0 would put all 2 processes")
    assert "LOCAL_RANK" in result.stderr


# ------------------------------------------------------------------------------------------- safety models


def test_safety_scores_run_where_the_models_are_in_fp32_whatever_the_inputs(safe_checkpoint):  # noqa: F811
    # A CUDA runner's filter moves the suite to the GPU; calibration then scores rollouts recorded on the
    # host (benchmarks/signals.py keeps them there), and a bf16 runner hands bf16 features.
    suite = load_safety(safe_checkpoint)
    state = torch.randn(3, STATE_DIM)
    candidates = torch.randn(3, 5, ACTION_STEPS * ACTION_DIM)
    on_cpu = suite.score(state, candidates)
    assert set(on_cpu) == {"novelty", "rnd", "risk", "ldm"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = suite.score(state.bfloat16(), candidates.bfloat16())
    for name, values in mixed.items():
        assert values.dtype == torch.float32 and values.shape == (3, 5)
        torch.testing.assert_close(values, on_cpu[name], rtol=0.05, atol=0.05 * on_cpu[name].abs().max())
    for module in suite.modules().values():
        module.to("meta")  # another device than the inputs'
    elsewhere = suite.score(state, candidates)
    assert {values.device.type for values in elsewhere.values()} == {"meta"}


# ------------------------------------------------------------------------------------------- the demo


def test_flotilla_demo_device_reaches_its_training_and_a_missing_gpu_is_one_line(tmp_path):
    import dataclasses

    from policies.config import TrainConfig
    from sim.demo import DemoConfig, train_config
    from tests.test_cli import flotilla

    demo = DemoConfig(task="reach", policy="diffusion", device="cpu", train=TrainConfig(device="cuda:1"))
    assert train_config(demo, ["d.zarr"], tmp_path, "v").device == "cpu"
    assert train_config(dataclasses.replace(demo, device="auto"), ["d.zarr"], tmp_path, "v").device == "auto"
    bad = flotilla("demo", f"out={tmp_path / 'demo'}", "device=gpu", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "flotilla demo: device: must be auto, cpu, cuda or cuda:N, got 'gpu'"
    if not torch.cuda.is_available():
        missing = flotilla("demo", f"out={tmp_path / 'demo'}", "device=cuda", check=False)
        assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
        assert missing.stderr.startswith("flotilla demo: device: cuda requested but")
        assert not (tmp_path / "demo" / "demos.zarr").exists()  # refused before collecting anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    "job, args",
    [
        ("fleet", ["server=127.0.0.1:9"]),  # nothing listens there: the device is refused before connecting
        ("safety", ["checkpoint=tests/fixtures/checkpoints_v1/diffusion"]),
    ],
)
def test_device_cuda_without_a_gpu_is_one_line_for_the_fleet_and_the_safety_models(job, args):
    from tests.test_cli import flotilla

    result = flotilla(job, *args, "device=cuda", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"flotilla {job}: device: cuda requested but")


# ------------------------------------------------------------------------------------------- batches


class DeviceToHost(TorchDispatchMode):
    """Records every copy from another device back to the CPU (a wait for that device on a GPU)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = out
            if source.device.type != "cpu" and target.device.type == "cpu":
                self.copies.append(str(func))
        return out


def test_frames_kept_on_the_host_are_gathered_without_reading_device_indices_back(tmp_path, monkeypatch):
    import policies.data.batches as batches_module

    data, _ = windows(tmp_path)
    data.steps["front_rgb"] = np.random.default_rng(0).integers(0, 256, (33, 8, 8, 3), dtype=np.uint8)
    dataset = WindowDataset(data, np.array([0, 1, 2]), ["state", "front_rgb"], n_obs_steps=2, horizon=4)
    monkeypatch.setattr(batches_module, "DEVICE_DATA_SHARE", 0.0)  # no room on the device for frames
    steps = DeviceSteps(data, ["state", "front_rgb", "action", "goal"], "meta")
    assert steps.host_keys == ["front_rgb"] and steps.tensors["front_rgb"].device == CPU
    batches = DeviceBatches(dataset, steps, with_index=True)
    watch = DeviceToHost()
    with watch:
        got = list(batches.epoch(4, drop_last=True))
    assert watch.copies == []  # (the old gather read the device indices back every batch: a GPU sync)
    assert len(got) == len(dataset) // 4
    for batch in got:
        assert batch["obs"]["front_rgb"].shape == (4, 2, 8, 8, 3)
        assert batch["obs"]["front_rgb"].device.type == batch["action"].device.type == "meta"
        assert batch["index"].device == CPU


# ------------------------------------------------------------------------------------------- capture safety


class HostToDevice(TorchDispatchMode):
    """Records the device ops fed from the host: a copy from the CPU, or a CPU tensor of more than one
    element as an input (0-d CPU tensors are scalars to a CUDA op, baked into a graph like Python floats;
    ops on the CPU alone, such as a scheduler's table lookups, run at capture and are not recorded)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        on_device = any(t.device.type != "cpu" for t in inputs + outputs)
        from_host = [t for t in inputs if t.device.type == "cpu"]
        copy = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        if on_device and (any(t.dim() > 0 for t in from_host) or (copy and from_host)):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("kind", ["diffusion", "gc_diffusion", "mlp"])
@pytest.mark.parametrize("ensemble", [1, 2])
@pytest.mark.parametrize("images", [True, False])
def test_every_policys_plan_stays_on_its_device_so_a_cuda_graph_can_capture_it(kind, ensemble, images):
    # On the meta device (no data) .item(), .cpu(), .numpy(), a branch on a tensor's value and an op mixing
    # a device tensor with a CPU one all raise: what CUDA graph capture cannot have inside predict_action.
    meta = META if images else ShapeMeta(obs={"state": (5,)}, action_dim=3, goal_dim=2)
    policy = fitted(kind, meta, ensemble=ensemble).eval().to("meta")
    obs = {key: value.to("meta") for key, value in observation(meta).items()}
    goal = torch.zeros(1, meta.goal_dim, device="meta")
    watch = HostToDevice()
    with torch.inference_mode(), watch:
        out = policy.predict_action(obs, goal, num_samples=3)
        features = policy_features(policy, obs, goal)  # the safety models' input, captured with the plan
    assert out.shape == (1, 3, policy.horizon, meta.action_dim) and out.device.type == "meta"
    assert features.shape[0] == 1 and features.device.type == "meta"
    assert watch.ops == []


@pytest.mark.parametrize("kind", ["diffusion", "gc_diffusion", "mlp"])
@pytest.mark.parametrize("ensemble", [1, 2])
def test_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch, kind, ensemble):
    # Gathering (frames from the host), loss, backward, clipping, AdamW and the EMA: no copy back to the host
    # and no .item() (on the meta device either would raise or be recorded), for ensembles too.
    import contextlib

    import policies.data.batches as batches_module
    from policies.train import EMA, train_step

    data, _ = windows(tmp_path)
    rng = np.random.default_rng(0)
    data.steps["front_rgb"] = rng.integers(0, 256, (33, 24, 24, 3), dtype=np.uint8)
    data.steps["state"] = rng.normal(size=(33, 5)).astype(np.float32)
    data.steps["action"] = rng.normal(size=(33, 3)).astype(np.float32)
    data.steps["goal"] = rng.normal(size=(33, 2)).astype(np.float32)
    dataset = WindowDataset(data, np.array([0, 1, 2]), ["state", "front_rgb"], n_obs_steps=2, horizon=16)
    monkeypatch.setattr(batches_module, "DEVICE_DATA_SHARE", 0.0)  # frames on the host: the harder case
    batches = DeviceBatches(
        dataset, DeviceSteps(data, ["state", "front_rgb", "action", "goal"], "meta"), True
    )
    policy = fitted(kind, META, ensemble=ensemble).to("meta")
    optimizer, ema = torch.optim.AdamW(policy.parameters(), lr=1e-3), EMA(policy)
    watch = DeviceToHost()
    with watch:
        for _, batch in zip(range(3), batches.epoch(4, drop_last=True), strict=False):
            loss, raw = train_step(policy, batch, optimizer, 1.0, contextlib.nullcontext(), ema)
    assert watch.copies == []
    assert loss.device.type == raw.device.type == "meta" and ema.updates == 3


# ------------------------------------------------------------------------------------------- bf16 inference


def assert_float32_action(action):
    assert isinstance(action, np.ndarray) and action.dtype == np.float32 and np.isfinite(action).all()


@pytest.mark.parametrize("kind", ["diffusion", "gc_diffusion", "mlp"])
def test_under_bf16_autocast_every_inference_entry_point_hands_float32_numpy(kind, one_torch_thread):
    # numpy has no bf16 (.numpy() on a bf16 tensor raises): a runner, a batched runner (the fleet's GPU
    # policies), and so eval and RegistryPolicies built on them, must hand float32 actions and signals.
    from policies.batched import BatchedPlanner

    policy = fitted(kind, META, ensemble=2 if kind == "mlp" else 1)
    rng = np.random.default_rng(0)
    obs = {
        "state": rng.normal(size=5).astype(np.float32),
        "front_rgb": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
        "goal": rng.normal(size=2).astype(np.float32),
    }
    runners = [PolicyRunner(policy, "v", num_samples=4), BatchedPlanner().runner(policy, "v", num_samples=4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for runner in runners:
            for _ in range(5):  # Ta = 4: a second plan
                assert_float32_action(runner.act(obs))
            assert isinstance(runner.uncertainty, float) and np.isfinite(runner.uncertainty)


def test_under_bf16_autocast_the_safety_filter_scores_and_picks_in_fp32(safe_checkpoint, one_torch_thread):  # noqa: F811
    from policies.safety.filter import FilterConfig
    from tests.test_safety_filter import K, observations

    runner = PolicyRunner.from_checkpoint(
        safe_checkpoint, num_samples=K, device="cpu", safety_filter=FilterConfig(mode="ldm")
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actions = [runner.act(obs) for obs in observations(12)]
    for action in actions:
        assert_float32_action(action)
    assert runner.signals["filter"] in ("pass", "switched", "hold")
    assert all(isinstance(v, float) for k, v in runner.signals.items() if k != "filter")
    assert {scores.dtype for scores in runner.safety.last.scores.values()} == {torch.float32}


# ------------------------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_suite.sh)"
)


@cuda
def test_robots_in_threads_build_and_replay_their_graphs_while_others_plan_eagerly():
    from concurrent.futures import ThreadPoolExecutor

    meta = ShapeMeta(obs={"state": (5,), "front_rgb": (24, 24, 3)}, action_dim=3)
    policy = fitted("diffusion", meta).cuda().eval()
    obs = {"state": np.zeros(5, np.float32), "front_rgb": np.zeros((24, 24, 3), np.uint8)}
    reference = PolicyRunner(policy, "v", device="cuda", noise_seed=4).act(obs)

    def robot(i):
        runner = PolicyRunner(policy, "v", device="cuda", noise_seed=4, cuda_graphs=i % 2 == 0)
        return [runner.act(obs) for _ in range(9)], runner.graph_replays

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(robot, range(6)))
    for i, (actions, replays) in enumerate(results):
        assert replays == (-(-9 // policy.n_action_steps) if i % 2 == 0 else 0)  # a graph per plan
        np.testing.assert_allclose(actions[0], reference, atol=1e-4)


# ------------------------------------------------------------------------------------------- compile


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CPU compile (CI runs it): spares the GPU suite's minutes"
)
def test_flotilla_train_compiles_in_reduce_overhead_mode_and_bad_settings_are_one_line(tmp_path, monkeypatch):
    # reduce-overhead is CUDA graphs for the step on a GPU; on the CPU it compiles as default. An ensemble
    # (its bootstrap counts come from the host: a graph break) trains through it too.
    from policies.checkpoint import load_checkpoint
    from tests.test_cli import flotilla

    write_store(tmp_path / "a.zarr", [[D] * 30, [D] * 25])
    args = [
        f"data={tmp_path / 'a.zarr'}",
        f"out={tmp_path / 'run'}",
        "task.obs_keys=[state]",
        "action_space.kind=delta",
        "policy=mlp",
        "policy.hidden_dims=[16]",
        "ensemble=2",
        "steps=6",
        "batch_size=8",
        "val_ratio=0",
        "progress=false",
        "tensorboard=false",
        "threads=1",
        "device=cpu",
        "compile=true",
    ]
    bad = flotilla("train", *args, "compile_mode=fast", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("flotilla train: compile_mode: ")
    assert "reduce-overhead" in bad.stderr
    with monkeypatch.context() as without_compilers:  # a slim image: the step would fail in a traceback
        without_compilers.setenv("PATH", str(tmp_path / "no-bin"))
        without_compilers.delenv("CXX", raising=False)
        bare = flotilla("train", *args, check=False)
    assert bare.returncode == 2 and len(bare.stderr.strip().splitlines()) == 1, bare.stderr
    assert bare.stderr.startswith("flotilla train: compile: torch.compile on cpu needs a C++ compiler")
    assert not (tmp_path / "run").exists()
    flotilla("train", *args, "compile_mode=reduce-overhead")
    policy = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest").policy
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    obs = {"state": np.zeros(policy.shape_meta.obs["state"], np.float32)}
    obs["goal"] = np.zeros(policy.shape_meta.goal_dim, np.float32)
    assert_float32_action(PolicyRunner(policy, "v").act(obs))


def test_precision_auto_takes_bf16_only_on_gpus_that_compute_it_natively():
    # torch.cuda.is_bf16_supported() says yes on a V100 or T4 too (emulated, slower than fp32).
    from policies.device import native_bf16

    assert [native_bf16(c) for c in [(7, 0), (7, 2), (7, 5), (8, 0), (8, 7), (9, 0), (10, 0)]] == [
        *[False] * 3,
        *[True] * 4,
    ]
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        expected = "bf16" if native_bf16(torch.cuda.get_device_capability(device)) else "fp32"
        assert resolve_precision("auto", device) == expected


@cuda
@pytest.mark.parametrize("kind", ["diffusion", "gc_diffusion", "mlp"])
def test_every_policy_kind_replayed_from_a_cuda_graph_gives_its_eager_actions(kind):
    # The goal is a static input of the graph too; the mlp is a 2-member ensemble (members in one graph).
    torch.manual_seed(0)
    policy = fitted(kind, META, ensemble=2 if kind == "mlp" else 1).cuda().eval()
    rng = np.random.default_rng(1)
    eager = PolicyRunner(policy, "v", num_samples=2, device="cuda", noise_seed=4)
    graphed = PolicyRunner(policy, "v", num_samples=2, device="cuda", noise_seed=4, cuda_graphs=True)
    for _ in range(2 * policy.n_action_steps):  # two plans, from different observations and goals
        obs = {
            "state": rng.normal(size=5).astype(np.float32),
            "front_rgb": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
            "goal": rng.normal(size=2).astype(np.float32),
        }
        np.testing.assert_allclose(graphed.act(obs), eager.act(obs), atol=1e-4)
    assert graphed.graph_replays == 2
    assert abs(graphed.uncertainty - eager.uncertainty) < 1e-4


@cuda
def test_safety_models_fit_calibrate_and_filter_on_the_gpu(stores, tmp_path):  # noqa: F811
    safety_models_on(torch.device("cuda"), stores, tmp_path)


def safety_models_on(device, stores, tmp_path):  # noqa: F811
    """`flotilla safety device=...` end to end, then a runner filtering on ``device``, and calibration's
    scoring of rollouts recorded on the host with the suite on ``device``."""
    import shutil

    from policies.safety.config import SafetyConfig, SafetyJobConfig
    from policies.safety.filter import FilterConfig
    from policies.safety.fit import Rollout, rollout_scores
    from policies.safety.train import fit_checkpoint
    from tests.test_safety_train import V1

    checkpoint = tmp_path / "diffusion"
    shutil.copytree(V1, checkpoint)
    demos, fleet = stores
    summary = fit_checkpoint(
        SafetyJobConfig(
            checkpoint=str(checkpoint),
            data=[str(fleet)],
            demos=[str(demos)],
            model=SafetyConfig(hidden=16, flow_steps=20, rnd_steps=20, risk_steps=20, ldm_steps=20),
            num_samples=3,
            calibration_ratio=0.5,
            device=str(device),
        )
    )
    assert summary["calibration_episodes"] == 2 and set(summary["filter_thresholds"]) == {"novelty", "ldm"}
    runner = PolicyRunner.from_checkpoint(
        checkpoint, num_samples=4, device=str(device), safety_filter=FilterConfig(mode="ldm")
    )
    assert_float32_action(
        runner.act({"ee_pos": np.full(3, 0.4, np.float32), "goal": np.full(3, 0.4, np.float32)})
    )
    assert runner.signals["filter"] in ("pass", "switched", "hold")
    suite, plan = runner.safety.suite, runner.safety.last
    assert plan.state.device.type == device.type
    recorded = Rollout([0], [plan.state.cpu()], [plan.candidates.cpu()], [0], [0.0], length=1, success=True)
    scores = rollout_scores(suite, recorded)
    assert set(scores) >= {"novelty", "ldm"} and all(np.isfinite(v).all() for v in scores.values())


def test_safety_models_fit_calibrate_and_filter_on_the_cpu_the_same_way(stores, tmp_path):  # noqa: F811
    safety_models_on(CPU, stores, tmp_path)


def graph_and_eager_filters_agree(device, safe_checkpoint, cuda_graphs):  # noqa: F811
    """A filtering runner with the embedding precomputed (CUDA graphs: captured with the plan) against one
    that embeds eagerly: the same actions, signals and decisions."""
    from policies.safety.filter import FilterConfig
    from tests.test_safety_filter import K, observations

    runners = [
        PolicyRunner.from_checkpoint(
            safe_checkpoint,
            K,
            device=device,
            noise_seed=4,
            cuda_graphs=graphs,
            safety_filter=FilterConfig(mode="ldm"),
        )
        for graphs in (False, cuda_graphs)
    ]
    eager, other = runners
    if not cuda_graphs:  # hand the filter the embedding computed ahead of time, as a graph's replay does
        review = other.safety.review

        def given_features(obs, goal, executed, uncertainty=0.0, features=None):
            assert features is None  # (an eager runner has none to give)
            return review(obs, goal, executed, uncertainty, other.safety.features(obs, goal))

        other.safety.review = given_features
    decisions = set()
    for obs in observations(24):
        np.testing.assert_allclose(other.act(obs), eager.act(obs), atol=1e-4)
        assert (
            other.signals.keys() == eager.signals.keys()
            and other.signals["filter"] == eager.signals["filter"]
        )
        for name, value in eager.signals.items():
            if name != "filter":
                assert abs(other.signals[name] - value) <= 1e-3 * max(1.0, abs(value)), name
        decisions.add(eager.signals["filter"])
    assert len(decisions) >= 2  # the observations' spread makes the filter both pass and switch or hold
    return other


def test_the_filter_given_the_embedding_decides_as_when_it_computes_it(safe_checkpoint):  # noqa: F811
    graph_and_eager_filters_agree("cpu", safe_checkpoint, False)


@cuda
def test_a_graphed_runner_filters_as_the_eager_one_with_the_embedding_in_its_graph(safe_checkpoint):  # noqa: F811
    runner = graph_and_eager_filters_agree("cuda", safe_checkpoint, True)
    assert runner.graph_replays > 0 and runner._graph.features is not None
