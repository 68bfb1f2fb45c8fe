"""Failure signals, safety models and the safety filter (issue 14).

- ``calibration``: conformal thresholds for any signal (numpy only, no torch: the fleet may import it).
- ``models``: the learned signals (a normalizing-flow density of (policy embedding, action), RND, a risk
  classifier) and the Lyapunov density model, trained from logged episodes, saved with the checkpoint.
- ``filter``: scores a policy's K candidate chunks and executes the best one the LDM allows, else holds.

Importing this package does not import torch; the submodules that need it do.
"""
