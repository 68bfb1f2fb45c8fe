"""Devices and precision (policies/device.py), device-resident training batches (policies/data/batches.py),
device-free checkpoints, and the CUDA-only checks (skipped without CUDA; benchmarks/gpu_suite.sh runs them)."""

import json

import numpy as np
import pytest
import torch

from benchmarks.policy_latency import fake_observation
from configs.schema import ConfigError
from fleet.labels import ControlLabel
from policies.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from policies.data.batches import DeviceBatches, DeviceSteps
from policies.data.windows import WindowDataset, load_episodes
from policies.device import (
    DeviceError,
    autocast,
    check_device,
    check_fits,
    parameter_count,
    resolve_device,
    resolve_precision,
)
from policies.models.factory import ShapeMeta, build_policy
from policies.runner import PolicyRunner
from tests.test_training_data import write_store

D, R, I = ControlLabel.DEMO, ControlLabel.ROBOT, ControlLabel.INTERVENTION  # noqa: E741
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_suite.sh)"
)
META = ShapeMeta(obs={"state": (5,), "front_rgb": (24, 24, 3)}, action_dim=3, goal_dim=2)
TINY = {"down_dims": [16, 32], "encoder": {"channels": [8, 16], "feature_dim": 8, "num_keypoints": 4}}


def fitted(kind="diffusion", meta=META, ensemble=1, **settings):
    tiny = TINY if kind != "mlp" else {"hidden_dims": [32], "encoder": TINY["encoder"]}
    policy = build_policy(kind, meta, ensemble=ensemble, **{**tiny, **settings})
    rng = np.random.default_rng(0)
    data = {
        key: rng.normal(size=(50, *shape)).astype(np.float32)
        for key, shape in meta.obs.items()
        if len(shape) == 1
    }
    data["action"] = rng.uniform(-2, 2, size=(50, meta.action_dim)).astype(np.float32)
    if meta.goal_dim:
        data["goal"] = rng.normal(size=(50, meta.goal_dim)).astype(np.float32)
    policy.normalizer.fit(data)
    return policy


def observation(meta=META, batch=1, n_obs=2, seed=0):
    return fake_observation(meta, batch, n_obs, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- devices


def test_device_names_resolve_and_bad_ones_are_one_line_config_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU", 0, None):
        with pytest.raises(ConfigError, match=r"^device: must be auto, cpu, cuda or cuda:N, got"):
            check_device(bad)
        with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_says_so_and_what_to_do():
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(DeviceError, match=rf"^device: {name} requested but .*set device=cpu"):
            resolve_device(name)
    with pytest.raises(
        DeviceError, match="CPU-only build" if torch.version.cuda is None else "no CUDA device"
    ):
        resolve_device("cuda")


def test_cuda_index_out_of_range_names_the_devices_there():
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match="requested but"):
        resolve_device(f"cuda:{count}")
    if count:
        with pytest.raises(DeviceError, match=rf"has {count} CUDA device\(s\): cuda:0..cuda:{count - 1}"):
            resolve_device(f"cuda:{count}")


def test_precision_auto_is_fp32_on_the_cpu_and_bad_values_are_config_errors():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="^precision: must be one of auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16", cpu)


def test_memory_check_refuses_what_cannot_fit(tmp_path):
    with pytest.raises(
        DeviceError, match=r"^device: a test model needs about 1048576.0 GiB on cpu, which has"
    ):
        check_fits(1 << 50, torch.device("cpu"), "a test model")
    check_fits(1 << 20, torch.device("cpu"), "a small model")  # 1 MiB fits
    params = parameter_count(lambda: build_policy("diffusion", META, **TINY))
    assert params == sum(p.numel() for p in build_policy("diffusion", META, **TINY).parameters())


def test_a_checkpoint_too_big_for_the_device_is_refused_before_loading(tmp_path, one_torch_thread):
    policy = fitted("diffusion", ShapeMeta(obs={"state": (5,)}, action_dim=3))
    save_checkpoint(tmp_path / "ckpt", policy, policy.shape_meta, "v1")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["policy"]["down_dims"] = [65536, 131072, 262144]  # ~10^12 parameters: no machine holds it
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"needs about \d+\.\d GiB on cpu, which has .* GiB free"):
        load_checkpoint(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------- precision


def test_bf16_autocast_trains_with_fp32_master_weights_on_the_cpu(one_torch_thread):
    torch.manual_seed(0)
    policy = fitted("diffusion")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    cpu = torch.device("cpu")
    batch = {"obs": observation(batch=8), "action": torch.rand(8, 16, 3) * 2 - 1, "goal": torch.randn(8, 2)}
    losses = []
    for _ in range(12):
        with autocast(cpu, "bf16"):
            loss = policy.compute_loss(batch).mean()
            cond = torch.randn(2, policy.obs_feature_dim + policy.goal_dim)
            assert policy.model(torch.randn(2, 16, 3), 5.0, cond).dtype == torch.bfloat16  # it is in effect
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert loss.dtype == torch.float32 and np.isfinite(losses).all()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in policy.parameters())
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns under bf16
    policy.eval()
    with torch.inference_mode(), autocast(cpu, "bf16"):
        actions = policy.predict_action(observation(), torch.randn(1, 2), num_samples=2)
    assert actions.dtype == torch.float32 and torch.isfinite(actions).all()


# ------------------------------------------------------------------------------------------- batches


def windows(tmp_path):
    write_store(tmp_path / "a.zarr", [[D] * 9, [R] * 4 + [I] * 7, [D] * 13])
    data = load_episodes([str(tmp_path / "a.zarr")], ["state"])
    data.steps["goal"] = np.repeat(np.arange(3, dtype=np.float32), [9, 11, 13])[:, None]
    return data, WindowDataset(data, np.array([0, 1, 2]), ["state"], n_obs_steps=2, horizon=4)


class Indexed(torch.utils.data.Dataset):  # what the trainer gave its DataLoader before (sample + index)
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "index": i}


def assert_same_batches(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.keys() == reference.keys()
        for key in ("action", "action_mask", "weight", "goal", "index"):
            assert mine[key].dtype == reference[key].dtype, key
            torch.testing.assert_close(mine[key], reference[key], rtol=0, atol=0)
        torch.testing.assert_close(mine["obs"]["state"], reference["obs"]["state"], rtol=0, atol=0)


def test_device_batches_are_the_dataloaders_batches_in_its_order(tmp_path):
    data, dataset = windows(tmp_path)
    batches = DeviceBatches(dataset, DeviceSteps(data, ["state", "action", "goal"]), with_index=True)
    loader = torch.utils.data.DataLoader(Indexed(dataset), batch_size=4, shuffle=True, drop_last=True)
    for epoch in range(2):
        torch.manual_seed(epoch)
        theirs = list(loader)
        after_theirs = torch.rand(3)
        torch.manual_seed(epoch)
        ours = list(batches.epoch(4, epoch, drop_last=True))
        assert_same_batches(ours, theirs)
        torch.testing.assert_close(torch.rand(3), after_theirs)  # the global RNG is where it was


def test_device_batches_match_the_distributed_sampler_per_rank(tmp_path):
    data, dataset = windows(tmp_path)
    batches = DeviceBatches(dataset, DeviceSteps(data, ["state", "action", "goal"]), with_index=True)
    for rank in range(3):
        sampler = torch.utils.data.DistributedSampler(Indexed(dataset), 3, rank, seed=5)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(Indexed(dataset), batch_size=4, sampler=sampler, drop_last=False)
        assert_same_batches(list(batches.epoch(4, 2, seed=5, rank=rank, world=3)), list(loader))


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_device_free_and_load_on_any_device(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    policy = fitted("gc_diffusion")
    obs, goal = observation(), torch.randn(1, 2)
    policy.eval()
    with torch.inference_mode():
        expected = policy.predict_action(obs, goal, generator=torch.Generator().manual_seed(3))
    # A checkpoint as a GPU run writes it: the trainer records where it trained (training.device), the
    # weights themselves carry no device; it loads wherever map_location says.
    save_checkpoint(tmp_path / "ckpt", policy, META, "v1", training={"device": "cuda:3", "precision": "bf16"})
    for device in ["cpu", torch.device("cpu")] + (["cuda"] if torch.cuda.is_available() else []):
        loaded = load_checkpoint(tmp_path / "ckpt", map_location=device).policy
        device = torch.device(device).type
        assert {p.device.type for p in loaded.parameters()} == {device}
        with torch.inference_mode():
            on = {k: v.to(device) for k, v in obs.items()}
            actions = loaded.predict_action(
                on, goal.to(device), generator=torch.Generator(device).manual_seed(3)
            )
        if device == "cpu":
            torch.testing.assert_close(actions, expected)


def test_runner_runs_on_the_device_it_is_given_numpy_in_and_out(tmp_path, one_torch_thread):
    policy = fitted("diffusion", ShapeMeta(obs={"state": (5,)}, action_dim=3))
    save_checkpoint(tmp_path / "ckpt", policy, policy.shape_meta, "v1")
    runner = PolicyRunner.from_checkpoint(tmp_path / "ckpt", num_samples=3, device="cpu", noise_seed=1)
    assert runner.device == torch.device("cpu")
    action = runner.act({"state": np.zeros(5, np.float32)})
    assert isinstance(action, np.ndarray) and action.dtype == np.float32 and action.shape == (3,)
    with pytest.raises(ConfigError, match="^device: must be auto"):
        PolicyRunner.from_checkpoint(tmp_path / "ckpt", device="tpu")


# ------------------------------------------------------------------------------------------- CUDA only


@cuda
def test_cuda_runner_matches_the_cpu_and_a_gpu_checkpoint_loads_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    policy = fitted("diffusion", ShapeMeta(obs={"state": (5,)}, action_dim=3)).cuda()
    save_checkpoint(tmp_path / "gpu", policy, policy.shape_meta, "v1")  # saved from CUDA tensors
    on_cpu = load_checkpoint(tmp_path / "gpu", map_location="cpu").policy
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    runners = {
        device: PolicyRunner.from_checkpoint(tmp_path / "gpu", device=device) for device in ("cpu", "cuda")
    }
    # The same inputs through the denoiser on both devices (TF32 may be on: a loose tolerance).
    x, cond = torch.randn(1, 16, 3), torch.randn(1, on_cpu.obs_feature_dim)
    outs = {}
    for device, runner in runners.items():
        with torch.inference_mode():
            outs[device] = runner.policy.model(x.to(device), 9.0, cond.to(device)).cpu()
    torch.testing.assert_close(outs["cuda"], outs["cpu"], atol=1e-2, rtol=1e-2)
    action = runners["cuda"].act({"state": np.zeros(5, np.float32)})
    assert action.shape == (3,) and action.dtype == np.float32


@cuda
def test_cuda_graph_runner_gives_the_eager_actions():
    torch.manual_seed(0)
    meta = ShapeMeta(obs={"state": (5,), "front_rgb": (24, 24, 3)}, action_dim=3)
    policy = fitted("diffusion", meta).cuda().eval()
    obs = {"state": np.zeros(5, np.float32), "front_rgb": np.zeros((24, 24, 3), np.uint8)}
    eager = PolicyRunner(policy, "v", device="cuda", noise_seed=4)
    graphed = PolicyRunner(policy, "v", device="cuda", noise_seed=4, cuda_graphs=True)
    for _ in range(3):
        np.testing.assert_allclose(graphed.act(obs), eager.act(obs), atol=1e-4)
    assert graphed.graph_replays > 0


@cuda
def test_frames_left_in_pinned_host_memory_give_the_same_batches(tmp_path, monkeypatch):
    import policies.data.batches as batches_module

    data, dataset = windows(tmp_path)
    data.steps["front_rgb"] = np.random.default_rng(0).integers(0, 256, (33, 8, 8, 3), dtype=np.uint8)
    dataset = WindowDataset(data, np.array([0, 1, 2]), ["state", "front_rgb"], n_obs_steps=2, horizon=4)
    keys = ["state", "front_rgb", "action", "goal"]
    on_device = DeviceBatches(dataset, DeviceSteps(data, keys, "cuda"))
    monkeypatch.setattr(batches_module, "DEVICE_DATA_SHARE", 0.0)  # no room: frames stay on the host
    pinned_steps = DeviceSteps(data, keys, "cuda")
    assert pinned_steps.host_keys == ["front_rgb"] and pinned_steps.tensors["front_rgb"].is_pinned()
    pinned = DeviceBatches(dataset, pinned_steps)
    index = torch.tensor([5, 0, 17, 3], device="cuda")
    a, b = on_device.gather(index), pinned.gather(index)
    assert b["obs"]["front_rgb"].device.type == "cuda"
    torch.testing.assert_close(a["obs"]["front_rgb"], b["obs"]["front_rgb"], rtol=0, atol=0)


@cuda
def test_bf16_training_step_on_cuda_keeps_fp32_weights():
    torch.manual_seed(0)
    policy = fitted("diffusion").cuda()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, fused=True)
    device = torch.device("cuda")
    batch = {
        "obs": {k: v.cuda() for k, v in observation(batch=8).items()},
        "action": torch.rand(8, 16, 3, device=device) * 2 - 1,
        "goal": torch.randn(8, 2, device=device),
    }
    with autocast(device, "bf16"):
        loss = policy.compute_loss(batch).mean()
    loss.backward()
    optimizer.step()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in policy.parameters())


# ------------------------------------------------------------------------------------------- the trainer


def test_flotilla_train_in_bf16_on_the_cpu_and_device_errors_are_one_line(tmp_path):
    from policies.checkpoint import read_config
    from tests.test_cli import flotilla

    write_store(tmp_path / "a.zarr", [[D] * 30, [D] * 25])
    args = [
        f"data={tmp_path / 'a.zarr'}",
        f"out={tmp_path / 'run'}",
        "task.obs_keys=[state]",
        "action_space.kind=delta",
        "policy.down_dims=[8,16]",
        "steps=4",
        "batch_size=8",
        "val_ratio=0",
        "progress=false",
        "tensorboard=false",
        "threads=1",
    ]
    flotilla("train", *args, "device=cpu", "precision=bf16")
    training = read_config(tmp_path / "run" / "checkpoints" / "latest")["training"]
    assert (training["device"], training["precision"], training["processes"]) == ("cpu", "bf16", 1)
    bad = flotilla("train", *args, "device=gpu", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "flotilla train: device: must be auto, cpu, cuda or cuda:N, got 'gpu'"
    if not torch.cuda.is_available():
        missing = flotilla("train", *args, "device=cuda:1", check=False)
        assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
        assert missing.stderr.startswith("flotilla train: device: cuda:1 requested but")


# ------------------------------------------------------------------------------------------- batched plans


def test_batched_planner_serves_a_ticks_plans_in_one_call_with_each_robots_own_result(one_torch_thread):
    from concurrent.futures import ThreadPoolExecutor

    from policies.batched import BatchedPlanner

    meta = ShapeMeta(obs={"state": (5,)}, action_dim=3, goal_dim=2)
    policy = fitted("mlp", meta)  # deterministic: a batched plan must equal the robot's plan alone
    planner, n = BatchedPlanner(), 4
    runners = [planner.runner(policy, "v") for _ in range(n)]
    alone = [PolicyRunner(policy, "v") for _ in range(n)]
    obs = [
        {"state": np.full(5, 0.3 * i, np.float32), "goal": np.full(2, -0.2 * i, np.float32)} for i in range(n)
    ]

    def robot(i):
        try:
            return runners[i].act(obs[i])
        finally:
            planner.finish()

    with ThreadPoolExecutor(n) as pool:
        for tick in range(3):
            if tick == 2:
                runners[1].reset()  # only robot 1 plans in this tick; the others finish without a plan
                alone[1].reset()
            with planner.tick(n):
                actions = list(pool.map(robot, range(n)))
            for i in range(n):
                np.testing.assert_allclose(actions[i], alone[i].act(obs[i]), rtol=1e-5, atol=1e-6)
    assert planner.batch_sizes == [4, 1]  # tick 0: every robot in one call; tick 1: queues still full
    runners[2].reset()
    runners[2].act(obs[2])  # outside a tick a runner plans alone
    assert planner.batch_sizes == [4, 1, 1]
    with pytest.raises(ValueError, match="noise_seed"):
        planner.runner(policy, "v", noise_seed=3)


def test_a_batched_sim_fleet_plans_its_robots_together(tmp_path, one_torch_thread):
    from collections import Counter

    from fleet.agent import POLICY
    from fleet.client import publish_checkpoint
    from tests.fleet_harness import TOKEN
    from tests.test_fleet_loop import make_fleet, start_server, tiny_checkpoint

    server = start_server(tmp_path)
    fleet = None
    try:
        tiny_checkpoint(tmp_path / "checkpoints", "tiny-v1", seed=1)
        publish_checkpoint(server.address, TOKEN["trainer"], tmp_path / "checkpoints" / "tiny-v1", "tiny-v1")
        fleet = make_fleet(server, 6, 0, "", batched=True, cache_dir=tmp_path / "cache", device="cpu")
        metrics = fleet.run_round(1, max_steps=40)
        assert fleet.flush(30)
    finally:
        if fleet is not None:
            fleet.close()
        server.stop()
    assert metrics.episodes == 6
    sizes = fleet.planner.batch_sizes
    # Every policy step came from a batched plan (Ta = 4: one plan yields at most 4 steps, so an episode's
    # run of n policy steps needs at least ceil(n / 4) plans; episodes end early on success, so n is
    # counted, not assumed), and robots whose plans fell due in the same tick (they start together)
    # shared one batched call rather than planning one by one.
    policy_steps = Counter((s.robot_id, s.episode_id) for s in fleet.steps if s.control == POLICY)
    assert sum(policy_steps.values()) > 0
    assert sum(sizes) >= sum(-(-n // 4) for n in policy_steps.values()) and max(sizes) >= 2
    assert {step.policy_version for step in fleet.steps} == {"tiny-v1"}
