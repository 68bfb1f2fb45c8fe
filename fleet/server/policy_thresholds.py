"""The request thresholds a published policy carries: its own held-out calibration.

`flotilla safety` saves, beside the policy, each signal's conformal threshold fitted on the policy's
held-out successful episodes (policies/safety/calibration.py; the "thresholds" of the checkpoint's
safety.json): at most the target share of that policy's nominal episodes would ever ask for help. When
such a checkpoint is published, the fleet server fixes the allocator's uncertainty and risk thresholds to
them (``allocation.policy_thresholds``), time-varying over each robot's episode where the calibration is,
for as long as that version is the latest. A better policy fails less, so fewer of its episodes cross its
thresholds and the fleet asks for less help; a policy published without them puts the thresholds back to
the configured ones.

Only the numpy calibration is imported here: the server does not import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fleet.allocation.core import THRESHOLD_SIGNALS
from policies.safety.calibration import SAFETY_JSON, ConformalThreshold

MAX_SAFETY_JSON_BYTES = 1024 * 1024  # read in the event loop: KB in practice


def published_thresholds(checkpoint: str | Path) -> dict[str, ConformalThreshold]:
    """The allocator signals' calibrated thresholds in a checkpoint folder: {} when it has no safety.json
    or no thresholds for them; ValueError naming the problem when the file cannot be used."""
    path = Path(checkpoint) / SAFETY_JSON
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_SAFETY_JSON_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, over {MAX_SAFETY_JSON_BYTES}")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
    saved = document.get("thresholds") if isinstance(document, dict) else None
    if saved is None:
        return {}
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: 'thresholds' must map signal names to thresholds")
    thresholds = {}
    for name in THRESHOLD_SIGNALS:
        if name not in saved:
            continue
        if not isinstance(saved[name], dict):
            raise ValueError(f"{path}: thresholds.{name} is not a calibrated threshold")
        threshold = ConformalThreshold.from_dict(saved[name])
        if not all(math.isfinite(value) for value in threshold.thresholds):
            raise ValueError(f"{path}: thresholds.{name} has a value that is not finite")
        thresholds[name] = threshold
    return thresholds
