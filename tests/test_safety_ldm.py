"""The Lyapunov density model on a small known MDP, where G is computed exactly by value iteration."""

from __future__ import annotations

import numpy as np
import torch

from policies.safety.models import SafetyConfig, Transitions, fit_ldm, ldm_target

GAMMA = 0.9
VIOLATION_ENERGY = 12.0

# A deterministic MDP: states 0..6, actions 0 ("safe") and 1 ("risky"). From states 0..4, action 0 goes
# right along a well-covered corridor, action 1 jumps to the rarely seen state 5, from which every
# action leads to the very rare state 6; state 6's action 1 violates a constraint. State 4 is terminal
# after its action (the episode ends). E(s, a) = -log p(s, a) is low on the corridor and high off it.
NEXT = {(s, 0): s + 1 for s in range(4)} | {(s, 1): 5 for s in range(5)} | {(5, 0): 6, (5, 1): 6}
NEXT |= {(4, 0): None, (6, 0): None, (6, 1): "violation"}
ENERGY = np.array(
    [[1.0, 2.0], [1.2, 2.0], [0.8, 2.5], [1.0, 2.2], [1.1, 2.4], [4.0, 4.5], [7.0, 8.0]], dtype=np.float64
)
N_STATES, N_ACTIONS = ENERGY.shape


def exact_ldm() -> np.ndarray:
    g = ENERGY.copy()
    for _ in range(500):
        new = np.empty_like(g)
        for (s, a), nxt in NEXT.items():
            e = ENERGY[s, a]
            future = e if nxt is None else VIOLATION_ENERGY if nxt == "violation" else g[nxt].min()
            new[s, a] = (1 - GAMMA) * e + GAMMA * max(e, future)
        g = new
    return g


def one_hot(s: int, a: int) -> torch.Tensor:
    x = torch.zeros(N_STATES + N_ACTIONS)
    x[s], x[N_STATES + a] = 1.0, 1.0
    return x


def transitions() -> Transitions:
    xs, energies, nexts, done, violation = [], [], [], [], []
    for (s, a), nxt in NEXT.items():
        xs.append(one_hot(s, a))
        energies.append(ENERGY[s, a])
        target = nxt if isinstance(nxt, int) else s  # ignored for ends and violations
        nexts.append(torch.stack([one_hot(target, b) for b in range(N_ACTIONS)]))  # min over all a'
        done.append(nxt is None or nxt == "violation")
        violation.append(nxt == "violation")
    return Transitions(
        torch.stack(xs),
        torch.tensor(energies, dtype=torch.float32),
        torch.stack(nexts),
        torch.tensor(done),
        torch.tensor(violation),
    )


def test_learned_ldm_matches_the_exact_fixed_point(one_torch_thread):
    exact = exact_ldm()
    # The look-ahead matters: the risky action's G is far above its own energy (it leads to state 6),
    # and the corridor's G stays at its energy level.
    assert exact[0, 1] > ENERGY[0, 1] + 3.0 and abs(exact[0, 0] - ENERGY[0:5, 0].max()) < 0.5
    cfg = SafetyConfig(ldm_steps=3000, ldm_tau=0.05, ldm_gamma=GAMMA, hidden=64, batch_size=32, lr=3e-3)
    net = fit_ldm(transitions(), cfg, VIOLATION_ENERGY)
    with torch.no_grad():
        learned = np.array(
            [[float(net(one_hot(s, a)[None])) for a in range(N_ACTIONS)] for s in range(N_STATES)]
        )
    seen = np.array([[(s, a) in NEXT for a in range(N_ACTIONS)] for s in range(N_STATES)])
    error = np.abs(learned - exact)[seen]
    assert error.max() < 0.05, f"learned\n{learned}\nexact\n{exact}"
    # The filter's question: from every corridor state the safe action has the lower G.
    assert all(learned[s, 0] < learned[s, 1] - 1.0 for s in range(4))


def test_backup_target_ends_and_violations():
    energy = torch.tensor([1.0, 1.0, 1.0, 5.0])
    next_min = torch.tensor([3.0, 0.5, 3.0, 3.0])
    done = torch.tensor([False, False, True, True])
    violation = torch.tensor([False, False, False, True])
    y = ldm_target(energy, next_min, done, violation, gamma=0.5, violation_energy=10.0)
    assert torch.allclose(y, torch.tensor([2.0, 1.0, 1.0, 7.5]))
