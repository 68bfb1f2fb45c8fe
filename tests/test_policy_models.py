"""Policy models: shapes, normalizer, learning on a few fixed pairs, guidance, augmentation, factory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.models import (
    DiffusionPolicy,
    GCDiffusionPolicy,
    LinearNormalizer,
    MLPPolicy,
    ShapeMeta,
    build_policy,
)
from policies.models.configs import EncoderConfig, policy_config_from_dict
from policies.models.encoders import ImageEncoder
from policies.models.gc_diffusion import karras_sigmas
from policies.models.unet1d import ConditionalUnet1D, Conv1d

LOWDIM = {"ee_pos": (3,), "object_pos": (3,), "gripper": (1,)}
TINY_UNET = {"down_dims": (32, 64), "step_embed_dim": 32}
TINY_IMAGE = {"encoder": {"channels": [8, 16], "feature_dim": 16, "num_keypoints": 8}}
KINDS = ("diffusion", "gc_diffusion", "mlp")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_kwargs(kind: str, image: bool) -> dict:
    kwargs = dict(TINY_UNET) if kind != "mlp" else {"hidden_dims": (64, 64)}
    if image:
        kwargs.update(TINY_IMAGE)
    return kwargs


def shape_meta(image: bool = False, goal_dim: int = 3, image_size: int = 32) -> ShapeMeta:
    obs = dict(LOWDIM)
    if image:
        obs["front_rgb"] = (image_size, image_size, 3)
    return ShapeMeta(obs=obs, action_dim=4, goal_dim=goal_dim)


def make_batch(meta: ShapeMeta, batch: int = 4, to: int = 2, tp: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    obs = {}
    for key, shape in meta.obs.items():
        if len(shape) == 3:
            obs[key] = torch.randint(0, 256, (batch, to, *shape), generator=gen, dtype=torch.uint8)
        else:
            obs[key] = torch.randn((batch, to, *shape), generator=gen) * 0.3 + 0.5
    out = {"obs": obs, "action": torch.rand((batch, tp, meta.action_dim), generator=gen) * 2 - 1}
    if meta.goal_dim:
        out["goal"] = torch.randn((batch, meta.goal_dim), generator=gen)
    return out


def fitted_normalizer(batch: dict) -> LinearNormalizer:
    data = {key: value for key, value in batch["obs"].items() if value.dtype != torch.uint8}
    data["action"] = batch["action"]
    if "goal" in batch:
        data["goal"] = batch["goal"]
    return LinearNormalizer().fit(data)


def build_fitted(kind: str, meta: ShapeMeta, batch: dict, **kwargs):
    policy = build_policy(kind, meta, **kwargs)
    policy.set_normalizer(fitted_normalizer(batch))
    return policy


# ============================================================================================ shapes
@pytest.mark.parametrize("image", [False, True], ids=["lowdim", "image"])
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_loss_and_gradients(kind, image):
    torch.manual_seed(0)
    meta = shape_meta(image=image)
    batch = make_batch(meta, batch=3)
    policy = build_fitted(kind, meta, batch, **tiny_kwargs(kind, image))
    assert (policy.n_obs_steps, policy.horizon, policy.n_action_steps) == (2, 16, 8)
    assert policy.kind == kind

    loss = policy.compute_loss(batch)
    assert loss.shape == (3,)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    loss.sum().backward()
    grads = {name: p.grad for name, p in policy.named_parameters()}
    assert all(g is not None for name, g in grads.items() if name != "null_goal")
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    if image:
        assert any(
            float(g.abs().sum()) > 0 for name, g in grads.items() if name.startswith("obs_encoder.images")
        )

    policy.eval()
    with torch.inference_mode():
        actions = policy.predict_action(batch["obs"], batch.get("goal"), num_samples=5)
    assert actions.shape == (3, 5, 16, 4)
    assert torch.isfinite(actions).all()
    if kind == "mlp":
        assert torch.equal(actions[:, 0], actions[:, 4])
    else:  # samples differ from one another
        assert (actions[:, 0] - actions[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["diffusion", "gc_diffusion"])
def test_num_samples_are_one_batched_pass(kind):
    meta = shape_meta()
    batch = make_batch(meta, batch=2)
    policy = build_fitted(kind, meta, batch, **TINY_UNET, num_inference_steps=4).eval()
    if kind == "gc_diffusion":
        policy.cfg_weight = 1.5  # the guidance pair must be batched too
    batch_sizes = []
    policy.model.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    with torch.inference_mode():
        policy.predict_action(batch["obs"], batch.get("goal"), num_samples=7)
    expected = 2 * 7 * (2 if kind == "gc_diffusion" else 1)
    assert batch_sizes == [expected] * 4


def test_bad_inputs_are_reported():
    meta = shape_meta()
    batch = make_batch(meta)
    policy = build_fitted("diffusion", meta, batch, **TINY_UNET).eval()
    with torch.inference_mode():
        with pytest.raises(ValueError, match="goal is required"):
            policy.predict_action(batch["obs"], None)
        with pytest.raises(ValueError, match="expected"):
            policy.predict_action({**batch["obs"], "ee_pos": batch["obs"]["ee_pos"][:, :1]}, batch["goal"])
        with pytest.raises(KeyError, match="gripper"):
            policy.predict_action({k: v for k, v in batch["obs"].items() if k != "gripper"}, batch["goal"])
    with pytest.raises(ValueError, match="action"):
        policy.compute_loss({**batch, "action": batch["action"][:, :8]})


# ============================================================================================ normalizer
@pytest.mark.parametrize("mode", ["limits", "gaussian"])
def test_normalizer_round_trip_and_constant_dims(mode):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 4)) * [1.0, 10.0, 0.01, 1.0] + [0.0, 5.0, -2.0, 0.0]).astype(np.float32)
    x[:, 3] = 0.7  # constant dimension
    normalizer = LinearNormalizer().fit({"state": x}, mode=mode)
    t = torch.from_numpy(x)
    y = normalizer.normalize("state", t)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[:, 3], torch.zeros(500), atol=1e-6)
    if mode == "limits":
        assert torch.allclose(y[:, :3].min(0).values, torch.full((3,), -1.0), atol=1e-5)
        assert torch.allclose(y[:, :3].max(0).values, torch.full((3,), 1.0), atol=1e-5)
    else:
        assert torch.allclose(y[:, :3].mean(0), torch.zeros(3), atol=1e-4)
        assert torch.allclose(y[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-4)
    back = normalizer.unnormalize("state", y)
    assert torch.allclose(back, t, rtol=1e-5, atol=1e-5)
    # leading dimensions are free: (B, T, D) works the same as (N, D)
    assert torch.allclose(normalizer.normalize("state", t.view(50, 10, 4)).view(500, 4), y)


def test_normalizer_unfitted_key_skips_images_and_checks_data():
    normalizer = LinearNormalizer({"action": 4})
    with pytest.raises(KeyError, match="action"):
        normalizer.normalize("action", torch.zeros(2, 4))
    with pytest.raises(KeyError, match="nope"):
        normalizer.unnormalize("nope", torch.zeros(2, 4))
    normalizer.fit({"action": np.ones((3, 4)), "cam_rgb": np.zeros((3, 8, 8, 3), dtype=np.uint8)})
    assert normalizer.fitted_keys() == ["action"]
    with pytest.raises(ValueError, match="dimension"):
        normalizer.fit({"action": np.ones((3, 5))})
    with pytest.raises(ValueError, match="NaN"):
        normalizer.fit({"x": np.array([[np.nan]])})
    with pytest.raises(ValueError, match="mode"):
        normalizer.fit({"x": np.ones((2, 1))}, mode="minmax")


def test_normalizer_state_dict_and_safetensors(tmp_path):
    normalizer = LinearNormalizer().fit({"a": np.arange(12.0).reshape(6, 2), "b": np.random.rand(9, 3)})
    path = tmp_path / "norm.safetensors"
    save_file(normalizer.state_dict(), str(path))
    restored = LinearNormalizer()
    restored.load_state_dict(load_file(str(path)))
    assert restored.fitted_keys() == ["a", "b"]
    x = torch.randn(5, 2)
    assert torch.equal(restored.normalize("a", x), normalizer.normalize("a", x))
    assert (
        LinearNormalizer.from_dict(json.loads(json.dumps(normalizer.to_dict()))).to_dict()
        == normalizer.to_dict()
    )


def test_set_normalizer_requires_every_key():
    meta = shape_meta()
    batch = make_batch(meta)
    policy = build_policy("mlp", meta, hidden_dims=(16,))
    partial = LinearNormalizer().fit({"action": batch["action"]})
    with pytest.raises(KeyError, match="goal"):
        policy.set_normalizer(partial)
    with pytest.raises(KeyError, match="not fitted|no fitted"):
        policy.compute_loss(batch)


# ============================================================================================ learning
def overfit(policy, batch, steps: int, lr: float = 2e-3) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    policy.train()
    losses = []
    for _ in range(steps):
        loss = policy.compute_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses[:10])), float(np.mean(losses[-20:]))


def test_diffusion_overfits_fixed_pairs():
    torch.manual_seed(0)
    meta = shape_meta(goal_dim=0)
    gen = torch.Generator().manual_seed(1)
    obs = {key: torch.randn((4, 2, *shape), generator=gen) for key, shape in meta.obs.items()}
    t = torch.linspace(0, 1, 16)
    # four distinct smooth action chunks, one per observation
    action = torch.stack(
        [
            torch.stack(
                [
                    torch.sin(3 * t + i),
                    torch.cos(2 * t - i),
                    0.5 * t - 0.2 * i,
                    torch.full_like(t, (-1) ** i * 0.8),
                ],
                dim=-1,
            )
            for i in range(4)
        ]
    )
    batch = {"obs": obs, "action": action}
    policy = build_fitted(
        "diffusion", meta, batch, **TINY_UNET, prediction_type="sample", num_inference_steps=10
    )
    first, last = overfit(
        policy,
        {"obs": {k: v.repeat(16, 1, 1) for k, v in obs.items()}, "action": action.repeat(16, 1, 1)},
        steps=250,
    )
    assert last < 0.2 * first
    policy.eval()
    with torch.inference_mode():
        pred = policy.predict_action(obs, num_samples=4, generator=torch.Generator().manual_seed(0))
    error = (pred - action[:, None]).abs().mean().item()
    spread = (action[:, None] - action[None]).abs().mean().item()
    assert error < 0.15, f"mean abs error {error:.3f}"
    assert error < 0.25 * spread


def test_gc_diffusion_follows_the_goal():
    """Same observation, different goals -> different chunks: only the goal tells them apart."""
    torch.manual_seed(0)
    meta = shape_meta(goal_dim=2)
    obs = {key: torch.full((4, 2, *shape), 0.3) for key, shape in meta.obs.items()}
    goal = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    t = torch.linspace(0, 1, 16)[:, None]
    ramp = goal[:, None, :] * t * 0.9  # (4, 16, 2)
    action = torch.cat([ramp, -ramp[..., :1], 0.5 * goal[:, None, :1].expand(4, 16, 1)], dim=-1)
    batch = {"obs": obs, "action": action, "goal": goal}
    policy = build_fitted("gc_diffusion", meta, batch, **TINY_UNET, goal_dropout=0.1)
    first, last = overfit(
        policy,
        {
            "obs": {k: v.repeat(8, 1, 1) for k, v in obs.items()},
            "action": action.repeat(8, 1, 1),
            "goal": goal.repeat(8, 1),
        },
        steps=600,
        lr=3e-3,
    )
    assert last < 0.3 * first
    policy.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        pred = policy.predict_action(obs, goal, num_samples=4, generator=gen)
        policy.sampler = "dpmpp_2m"
        pred_2m = policy.predict_action(obs, goal, num_samples=4, generator=gen)
        policy.sampler, policy.cfg_weight = "ddim", 1.0
        pred_cfg = policy.predict_action(obs, goal, num_samples=4, generator=gen)
    spread = (action[:, None] - action[None]).abs().mean().item()  # distance between the goals' chunks
    errors = [(p - action[:, None]).abs().mean().item() for p in (pred, pred_2m, pred_cfg)]
    assert errors[0] < 0.1, f"mean abs errors (ddim, dpmpp_2m, ddim + cfg): {errors}"
    assert max(errors) < 0.4 * spread, (
        f"mean abs errors (ddim, dpmpp_2m, ddim + cfg): {errors}, spread {spread}"
    )
    # swapping the goals swaps the predictions
    with torch.inference_mode():
        policy.cfg_weight = 0.0
        swapped = policy.predict_action(obs, goal.flip(0), generator=gen)[:, 0]
    assert (swapped - action.flip(0)).abs().mean() < 0.1


def test_goal_dropout_only_in_training():
    torch.manual_seed(0)
    meta = shape_meta(goal_dim=3)
    batch = make_batch(meta, batch=64)
    policy = build_fitted("gc_diffusion", meta, batch, **TINY_UNET, goal_dropout=0.5)
    with torch.no_grad():
        policy.null_goal.normal_()
    other = {**batch, "goal": batch["goal"] + 1.0}

    def losses(mode_train: bool):
        policy.train(mode_train)
        torch.manual_seed(123)
        a = policy.compute_loss(batch)
        torch.manual_seed(123)
        b = policy.compute_loss(other)
        return (a - b).abs() < 1e-7  # identical loss <=> the goal was replaced by the null goal

    dropped = losses(True).float().mean().item()
    assert 0.25 < dropped < 0.75
    assert losses(False).float().mean().item() == 0.0
    policy.train()
    policy.compute_loss(batch).sum().backward()
    assert policy.null_goal.grad is not None and policy.null_goal.grad.abs().sum() > 0


def test_cfg_weight_changes_the_combination():
    meta = shape_meta(goal_dim=3)
    batch = make_batch(meta, batch=2)
    policy = build_fitted("gc_diffusion", meta, batch, **TINY_UNET).eval()
    with torch.no_grad():
        policy.null_goal.normal_()
    results = {}
    for w in (0.0, 2.0):
        policy.cfg_weight = w
        with torch.inference_mode():
            results[w] = policy.predict_action(
                batch["obs"], batch["goal"], generator=torch.Generator().manual_seed(5)
            )
    assert not torch.allclose(results[0.0], results[2.0])


def test_karras_sigmas():
    sigmas = karras_sigmas(3, 0.002, 10.0, 7.0)
    assert len(sigmas) == 4 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(10.0) and sigmas[2] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False))
    assert karras_sigmas(1, 0.002, 10.0) == [10.0, 0.0]


# ============================================================================================ encoders
def test_random_crop_only_in_training():
    encoder = ImageEncoder(
        (32, 32, 3), EncoderConfig(feature_dim=8, channels=[8], num_keypoints=4, crop_ratio=0.75)
    )
    assert encoder.crop == (24, 24)
    images = (
        torch.arange(8 * 32 * 32 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(8, 32, 32, 3)
    )
    images = images.clone()
    images[..., 0] = torch.arange(32, dtype=torch.uint8).view(1, 32, 1)  # channel 0 encodes the row
    encoder.train()
    torch.manual_seed(0)
    first, second = encoder.crop_images(images), encoder.crop_images(images)
    assert first.shape == (8, 24, 24, 3)
    assert not torch.equal(first, second)
    tops = first[:, 0, 0, 0].long()
    assert tops.unique().numel() > 1 and tops.max() <= 8  # independent offsets within range
    # a crop is a contiguous window of the image
    for n in range(8):
        top = int(tops[n])
        assert torch.equal(first[n, :, :, 0], images[n, top : top + 24, :24, 0])
    encoder.eval()
    centre = encoder.crop_images(images)
    assert torch.equal(centre, images[:, 4:28, 4:28])
    assert torch.equal(encoder(images), encoder(images))


def test_image_policy_eval_is_deterministic():
    meta = shape_meta(image=True)
    batch = make_batch(meta, batch=2)
    policy = build_fitted("diffusion", meta, batch, **TINY_UNET, **TINY_IMAGE).eval()
    with torch.inference_mode():
        a = policy.predict_action(batch["obs"], batch["goal"], generator=torch.Generator().manual_seed(3))
        b = policy.predict_action(batch["obs"], batch["goal"], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    policy.train()
    features = [policy.encode_obs(batch["obs"]) for _ in range(2)]
    assert not torch.allclose(features[0], features[1])  # train mode crops randomly


@pytest.mark.parametrize("stride,kernel,c_in", [(1, 3, 128), (2, 3, 128), (1, 5, 64), (1, 1, 256)])
def test_fast_conv_path_matches_convolution(stride, kernel, c_in):
    torch.manual_seed(0)
    conv = Conv1d(c_in, 32, kernel, stride=stride, padding=kernel // 2)
    assert conv._use_matmul
    x = torch.randn(1, c_in, 8, requires_grad=True)
    fast = conv(x)
    slow = torch.nn.functional.conv1d(x, conv.weight, conv.bias, stride=stride, padding=kernel // 2)
    assert fast.shape == slow.shape
    assert torch.allclose(fast, slow, atol=1e-5)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), conv.weight)
    (g_slow,) = torch.autograd.grad(slow.square().sum(), conv.weight)
    assert torch.allclose(g_fast, g_slow, atol=1e-4)


def test_unet_keeps_shape_and_uses_condition():
    torch.manual_seed(0)
    net = ConditionalUnet1D(4, 6, down_dims=(16, 32, 64), step_embed_dim=16)
    x = torch.randn(2, 16, 4)
    out = net(x, torch.tensor([3, 50]), torch.randn(2, 6))
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, torch.tensor([3, 50]), torch.randn(2, 6)))


# ============================================================================================ factory
@pytest.mark.parametrize("image", [False, True], ids=["lowdim", "image"])
@pytest.mark.parametrize("kind", KINDS)
def test_factory_round_trip(kind, image):
    meta = shape_meta(image=image)
    batch = make_batch(meta, batch=2)
    policy = build_fitted(kind, meta, batch, **tiny_kwargs(kind, image)).eval()
    config = policy_config_from_dict(json.loads(json.dumps(policy.config.to_dict())))
    assert config == policy.config and type(config) is type(policy.config)
    meta_again = ShapeMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert meta_again == meta
    rebuilt = build_policy(config, meta_again).eval()
    assert rebuilt.config == config
    state, state_again = policy.state_dict(), rebuilt.state_dict()
    assert list(state) == list(state_again)
    assert all(state[k].shape == state_again[k].shape for k in state)
    assert any(k.startswith("normalizer.") for k in state)
    with pytest.raises(KeyError):  # fresh policy: normalizer not fitted yet
        rebuilt.normalizer.normalize("action", batch["action"])
    rebuilt.load_state_dict(state)
    with torch.inference_mode():
        a = policy.predict_action(batch["obs"], batch["goal"], generator=torch.Generator().manual_seed(1))
        b = rebuilt.predict_action(batch["obs"], batch["goal"], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_factory_errors():
    meta = shape_meta()
    with pytest.raises(ValueError, match="unknown policy kind"):
        build_policy("transformer", meta)
    with pytest.raises(ValueError, match="down_dim"):
        build_policy("diffusion", meta, down_dim=(32,))
    with pytest.raises(ValueError, match="goal"):
        build_policy("gc_diffusion", shape_meta(goal_dim=0))
    with pytest.raises(ValueError, match="divisible"):
        build_policy("diffusion", meta, horizon=10, down_dims=(32, 64, 128))
    with pytest.raises(ValueError, match="prediction_type"):
        build_policy("diffusion", meta, prediction_type="v")
    with pytest.raises(ValueError, match="sampler"):
        build_policy("gc_diffusion", meta, sampler="heun9")
    with pytest.raises(ValueError, match="shape"):
        ShapeMeta(obs={"x": (2, 3)}, action_dim=4)
    assert isinstance(build_policy("diffusion", meta.to_dict(), **TINY_UNET), DiffusionPolicy)
    assert isinstance(build_policy("gc_diffusion", meta, **TINY_UNET), GCDiffusionPolicy)
    assert isinstance(build_policy("mlp", meta), MLPPolicy)


def test_every_model_and_the_ensemble_implement_the_policy_contract():
    from policies.models import Policy, PolicyEnsemble

    meta = shape_meta()
    for kind in KINDS:
        policy = build_policy(kind, meta, **tiny_kwargs(kind, False))
        assert isinstance(policy, Policy) and policy.ensemble_size == 1 and policy.config.kind == kind
    ensemble = build_policy("mlp", meta, ensemble=2, hidden_dims=(8,))
    assert (
        isinstance(ensemble, PolicyEnsemble) and isinstance(ensemble, Policy) and ensemble.ensemble_size == 2
    )
    assert ensemble.config is ensemble.members[0].config
    batch = make_batch(meta, batch=3)
    ensemble.set_normalizer(fitted_normalizer(batch))
    assert ensemble(batch).shape == (3,)  # forward is the per-sample loss, as for every policy

    class NoLoss(Policy):
        def predict_action(self, obs, goal=None, num_samples=1, generator=None):
            raise NotImplementedError

    with pytest.raises(TypeError, match="compute_loss"):
        NoLoss()
