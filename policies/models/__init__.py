"""Policy models: Diffusion Policy, goal-conditioned (BESO-style) diffusion, an MLP baseline.

Contract with the trainer, checkpoints and the inference runner
================================================================

Shape meta
    ``ShapeMeta(obs={key: shape}, action_dim, goal_dim=0)``. A shape of length 1, (D,), is a low-dim
    key; length 3, (H, W, C), is a uint8 camera image. ``to_dict()`` / ``ShapeMeta.from_dict()``
    round-trip through JSON. Low-dim keys are concatenated in sorted order; one CNN per image key.

Building
    Every kind has a config dataclass holding its defaults (policies/models/configs.py: ``DiffusionConfig``,
    ``GCDiffusionConfig``, ``MLPConfig``, each with an ``EncoderConfig``), checked in ``__post_init__``
    (``ConfigError`` naming the key). ``build_policy(config, shape_meta)`` builds the model from one;
    ``build_policy(kind, shape_meta, **settings)`` from the kind's defaults with ``settings`` changed
    (ValueError for an unknown kind or setting, or a value the config or the model rejects, e.g.
    gc_diffusion with goal_dim == 0). ``policy.config`` is the policy's config (current inference
    settings included): ``build_policy(policy.config, shape_meta)`` rebuilds the same architecture.

Horizons (config settings and policy attributes)
    ``n_obs_steps`` To, ``horizon`` Tp, ``n_action_steps`` Ta.
    The model predicts whatever Tp-step window the trainer's ``batch["action"]`` holds; with Diffusion
    Policy's convention (actions of steps t-To+1 .. t-To+Tp) the runner executes
    ``actions[To-1 : To-1+Ta]``. For the U-Nets, Tp must be divisible by 2 ** (len(down_dims) - 1).

Batches (all tensors unnormalized; the policy normalizes internally)
    ``{"obs": {key: (B, To, *shape)}, "action": (B, Tp, action_dim), "goal": (B, goal_dim)}``
    ("goal" absent when goal_dim == 0). Images are uint8 (B, To, H, W, C); the encoder scales them to
    [0, 1], channels first, and crops (random crop in train mode, centre crop in eval mode;
    ``EncoderConfig.crop_ratio`` of the image).

Every policy (``Policy``, policies/models/base.py: an abstract ``nn.Module``; attribute ``kind``)
    ``normalizer``: a ``LinearNormalizer`` submodule, pre-registered (unfitted) with the low-dim obs
        keys, "action" and "goal" (if goal_dim > 0), so state_dict keys are fixed at construction
        (``normalizer.stats.<key>.scale|offset|fitted``) and a freshly built policy loads a saved
        state dict strictly. ``normalizer_keys()`` lists the keys to fit.
    ``set_normalizer(normalizer)``: copies the needed statistics from a fitted LinearNormalizer
        (KeyError naming any missing key). ``ensemble_size``: 1 (E for an ensemble).
    ``compute_loss(batch) -> (B,)``: per-sample loss (mean over all but the batch dimension), for
        sample weighting; differentiable. Goal dropout / augmentation only in train mode.
        ``policy(batch)`` (forward) is the same call, for DistributedDataParallel wrappers.
    ``predict_action(obs, goal=None, num_samples=1, generator=None) -> (B, num_samples, Tp, action_dim)``
        unnormalized. All samples (and, for guided gc_diffusion, the conditional/unconditional pair)
        go through the denoiser in one batched forward per sampling step. Call ``policy.eval()``
        first (train mode would random-crop images) and run it under ``torch.inference_mode()``.
        ``generator`` (optional) makes the initial noise reproducible. ``Policy.predict_action`` checks
        ``num_samples`` and calls the kind's ``_predict``.
    ``config`` as above; ``n_obs_steps``, ``horizon``, ``n_action_steps`` attributes.

LinearNormalizer
    Per key y = x * scale + offset over the last dimension, buffers in the state dict.
    ``fit(data, mode="limits"|"gaussian")`` (data: key -> array (..., D); uint8 arrays, i.e. images,
    are skipped); "limits" maps [min, max] to [-1, 1], a constant dimension gets scale 1 and maps to
    0. ``normalize(key, x)`` / ``unnormalize(key, x)``; an unfitted key raises KeyError.
    ``to_dict()`` / ``from_dict()`` for JSON statistics.

Kinds (settings and defaults: their configs; details: each module's docstring)
    "diffusion"     DDPM training, DDIM sampling (diffusers schedulers), a FiLM-conditioned 1-D U-Net.
                    Condition = obs features of To steps (+ normalized goal when goal_dim > 0).
    "gc_diffusion"  EDM/Karras preconditioning, a few-step Karras-schedule sampler ("ddim" first order
                    or "dpmpp_2m"); goal dropout with a learned null goal; guidance weight w:
                    D = D_uncond + (1 + w) (D_cond - D_uncond). The same U-Net as "diffusion".
                    ``num_inference_steps``, ``sampler`` and ``cfg_weight`` can be changed after loading.
    "mlp"           obs features (+ goal) -> MLP (Mish) -> Tp x action_dim, MSE; predict_action repeats
                    its one chunk num_samples times.
    Image encoder (only with image keys): stem conv stride 2, residual stages with GroupNorm, spatial
    softmax keypoints, linear to the feature size.

Ensembles
    ``build_policy(config, shape_meta, ensemble=E)`` with E >= 2 gives a ``PolicyEnsemble``
    (policies/models/ensemble.py): E members of that config, different initial seeds, one
    shared normalizer, bootstrap-weighted training (the trainer adds ``batch["index"]``). It keeps the
    contract above (``kind`` and ``config`` are the members'; ``ensemble_size`` is E): sample k of
    ``predict_action`` comes from member k mod E, so sample 0 is member 0's and the spread of K >= E
    samples is the members' disagreement. Checkpoints record E as ``ensemble`` in config.json.

EMA weights are the trainer's business (keep an EMA copy of the whole module).
"""

import importlib

# Imported on first use (PEP 562), so the configs (policies/models/configs.py) load without torch.
_EXPORTS = {
    "DiffusionPolicy": "policies.models.diffusion",
    "GCDiffusionPolicy": "policies.models.gc_diffusion",
    "MLPPolicy": "policies.models.mlp",
    "ImageEncoder": "policies.models.encoders",
    "ObsEncoder": "policies.models.encoders",
    "PolicyBase": "policies.models.encoders",
    "ShapeMeta": "policies.models.encoders",
    "Policy": "policies.models.base",
    "PolicyEnsemble": "policies.models.ensemble",
    "ensemble_size": "policies.models.ensemble",
    "POLICIES": "policies.models.factory",
    "build_policy": "policies.models.factory",
    "policy_kwargs": "policies.models.factory",
    "LinearNormalizer": "policies.models.normalizer",
    "PolicyConfig": "policies.models.configs",
    "DiffusionConfig": "policies.models.configs",
    "GCDiffusionConfig": "policies.models.configs",
    "MLPConfig": "policies.models.configs",
    "EncoderConfig": "policies.models.configs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
