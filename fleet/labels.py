"""Who was in control at a step, following Sirius (Liu et al., 2022).

The numeric codes are what the episode store and the wire protocol carry; never renumber them.
"""

from __future__ import annotations

import enum


class ControlLabel(enum.IntEnum):
    DEMO = 0  # a human demonstration collected before deployment
    ROBOT = 1  # the robot acting autonomously
    PRE_INTERVENTION = 2  # robot steps just before a human took over (relabelled at takeover)
    INTERVENTION = 3  # a human teleoperator in control during deployment

    @classmethod
    def parse(cls, value: ControlLabel | str | int) -> ControlLabel:
        """Accept a label, its name ('pre_intervention', any case) or its code."""
        if isinstance(value, cls):
            return value
        try:
            if isinstance(value, str):
                return cls[value.strip().upper()]
            return cls(int(value))
        except (KeyError, ValueError, TypeError):
            valid = ", ".join(f"{label.name.lower()} ({label.value})" for label in cls)
            raise ValueError(f"unknown control label {value!r}; valid labels: {valid}") from None

    @property
    def label_name(self) -> str:
        return self.name.lower()
