"""Policy models: Diffusion Policy, goal-conditioned (BESO-style) diffusion, an MLP baseline.

Contract with the trainer, checkpoints and the inference runner
================================================================

Shape meta
    ``ShapeMeta(obs={key: shape}, action_dim, goal_dim=0)``. A shape of length 1, (D,), is a low-dim
    key; length 3, (H, W, C), is a uint8 camera image. ``to_dict()`` / ``ShapeMeta.from_dict()``
    round-trip through JSON. Low-dim keys are concatenated in sorted order; one CNN per image key.

Building
    ``build_policy(kind, shape_meta, **config)`` with kind "diffusion", "gc_diffusion" or "mlp";
    ValueError for an unknown kind, unknown keyword arguments or rejected values (e.g. gc_diffusion
    with goal_dim == 0). ``policy.config()`` returns the JSON-serializable keyword arguments that
    rebuild the same architecture: ``build_policy(policy.kind, shape_meta, **policy.config())``.
    ``policy_kwargs(kind)`` lists the accepted keywords.

Horizons (constructor arguments and attributes)
    ``n_obs_steps`` To (default 2), ``horizon`` Tp (default 16), ``n_action_steps`` Ta (default 8).
    The model predicts whatever Tp-step window the trainer's ``batch["action"]`` holds; with Diffusion
    Policy's convention (actions of steps t-To+1 .. t-To+Tp) the runner executes
    ``actions[To-1 : To-1+Ta]``. For the U-Nets, Tp must be divisible by 2 ** (len(down_dims) - 1).

Batches (all tensors unnormalized; the policy normalizes internally)
    ``{"obs": {key: (B, To, *shape)}, "action": (B, Tp, action_dim), "goal": (B, goal_dim)}``
    ("goal" absent when goal_dim == 0). Images are uint8 (B, To, H, W, C); the encoder scales them to
    [0, 1], channels first, and crops (random crop in train mode, centre crop in eval mode;
    ``crop_ratio`` default 0.875, i.e. 84 of 96).

Every policy (``nn.Module``; class attribute ``kind``)
    ``normalizer``: a ``LinearNormalizer`` submodule, pre-registered (unfitted) with the low-dim obs
        keys, "action" and "goal" (if goal_dim > 0), so state_dict keys are fixed at construction
        (``normalizer.stats.<key>.scale|offset|fitted``) and a freshly built policy loads a saved
        state dict strictly. ``normalizer_keys()`` lists the keys to fit.
    ``set_normalizer(normalizer)``: copies the needed statistics from a fitted LinearNormalizer
        (KeyError naming any missing key).
    ``compute_loss(batch) -> (B,)``: per-sample loss (mean over all but the batch dimension), for
        sample weighting; differentiable. Goal dropout / augmentation only in train mode.
        ``policy(batch)`` (forward) is the same call, for DistributedDataParallel wrappers.
    ``predict_action(obs, goal=None, num_samples=1, generator=None) -> (B, num_samples, Tp, action_dim)``
        unnormalized. All samples (and, for guided gc_diffusion, the conditional/unconditional pair)
        go through the denoiser in one batched forward per sampling step. Call ``policy.eval()``
        first (train mode would random-crop images) and run it under ``torch.inference_mode()``.
        ``generator`` (optional) makes the initial noise reproducible.
    ``config() -> dict`` as above; ``n_obs_steps``, ``horizon``, ``n_action_steps`` attributes.

LinearNormalizer
    Per key y = x * scale + offset over the last dimension, buffers in the state dict.
    ``fit(data, mode="limits"|"gaussian")`` (data: key -> array (..., D); uint8 arrays, i.e. images,
    are skipped); "limits" maps [min, max] to [-1, 1], a constant dimension gets scale 1 and maps to
    0. ``normalize(key, x)`` / ``unnormalize(key, x)``; an unfitted key raises KeyError.
    ``to_dict()`` / ``from_dict()`` for JSON statistics.

Kinds and their defaults (see each module's docstring for the details)
    "diffusion"     DDPM training (diffusers DDPMScheduler, 100 steps, squaredcos_cap_v2, clip_sample,
                    prediction_type "epsilon" or "sample"), DDIM sampling (diffusers DDIMScheduler,
                    num_inference_steps 10, trailing spacing). U-Net down_dims (64, 128, 256),
                    kernel_size 3, n_groups 8, step_embed_dim 64. Condition = obs features of To
                    steps (+ normalized goal when goal_dim > 0).
    "gc_diffusion"  EDM/Karras preconditioning, sigma_data 0.5, sigma in [0.002, 10] (log-normal,
                    ln sigma ~ N(-1.2, 1.2^2), in training), Karras sampling schedule rho 7 with num_inference_steps 3, sampler
                    "ddim" (first order) or "dpmpp_2m"; goal_dropout 0.1 with a learned null goal;
                    cfg_weight w (default 0): D = D_uncond + (1 + w) (D_cond - D_uncond). The same
                    U-Net as "diffusion". Attributes ``num_inference_steps``, ``sampler`` and
                    ``cfg_weight`` can be changed after loading.
    "mlp"           obs features (+ goal) -> MLP (hidden_dims (256, 256, 256), Mish) -> Tp x action_dim,
                    MSE; predict_action repeats its one chunk num_samples times.
    Image encoder (only with image keys): stem conv stride 2, residual stages image_channels
    (32, 64, 128, 256) with GroupNorm, image_blocks_per_stage 1, spatial softmax with num_keypoints 32,
    linear to image_feature_dim 64.

Ensembles
    ``build_policy(kind, shape_meta, ensemble=E, **config)`` with E >= 2 gives a ``PolicyEnsemble``
    (policies/models/ensemble.py): E members of that kind and config, different initial seeds, one
    shared normalizer, bootstrap-weighted training (the trainer adds ``batch["index"]``). It keeps the
    contract above (``kind`` and ``config()`` are the members'; ``ensemble_size`` is E): sample k of
    ``predict_action`` comes from member k mod E, so sample 0 is member 0's and the spread of K >= E
    samples is the members' disagreement. Checkpoints record E as ``ensemble`` in config.json.

EMA weights are the trainer's business (keep an EMA copy of the whole module).
"""

from policies.models.diffusion import DiffusionPolicy
from policies.models.encoders import ImageEncoder, ObsEncoder, PolicyBase, ShapeMeta
from policies.models.ensemble import PolicyEnsemble, ensemble_size
from policies.models.factory import POLICIES, build_policy, policy_kwargs
from policies.models.gc_diffusion import GCDiffusionPolicy
from policies.models.mlp import MLPPolicy
from policies.models.normalizer import LinearNormalizer

__all__ = [
    "POLICIES",
    "DiffusionPolicy",
    "GCDiffusionPolicy",
    "ImageEncoder",
    "LinearNormalizer",
    "MLPPolicy",
    "ObsEncoder",
    "PolicyBase",
    "PolicyEnsemble",
    "ShapeMeta",
    "build_policy",
    "ensemble_size",
    "policy_kwargs",
]
