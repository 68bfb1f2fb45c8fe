"""The one place protocol enums meet the rest of the code: control labels, allocation reasons, errors.

The episode store keeps its own label codes (fleet.labels.ControlLabel: demo 0 ... intervention 3, never
renumbered); on the wire v1 reserves 0 for UNSPECIFIED, so a step without a label is refused rather
than logged as a demonstration. Allocation reasons are strings inside the server (fleet/allocation/)
and enums on the wire.
"""

from __future__ import annotations

from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb

_LABEL_TO_WIRE = {
    ControlLabel.DEMO: pb.CONTROL_LABEL_DEMO,
    ControlLabel.ROBOT: pb.CONTROL_LABEL_ROBOT,
    ControlLabel.PRE_INTERVENTION: pb.CONTROL_LABEL_PRE_INTERVENTION,
    ControlLabel.INTERVENTION: pb.CONTROL_LABEL_INTERVENTION,
}
_LABEL_FROM_WIRE = {wire: label for label, wire in _LABEL_TO_WIRE.items()}

_ASSIGNMENT_REASONS = {
    "constraint_violation": pb.ASSIGNMENT_REASON_CONSTRAINT_VIOLATION,
    "uncertainty": pb.ASSIGNMENT_REASON_UNCERTAINTY,
    "risk": pb.ASSIGNMENT_REASON_RISK,
    "random": pb.ASSIGNMENT_REASON_RANDOM,
    "density": pb.ASSIGNMENT_REASON_DENSITY,
}
_RELEASE_REASONS = {
    "operator_release": pb.RELEASE_REASON_OPERATOR_RELEASE,
    "no_longer_needed": pb.RELEASE_REASON_NO_LONGER_NEEDED,
    "reset_done": pb.RELEASE_REASON_RESET_DONE,
    "operator_disconnected": pb.RELEASE_REASON_OPERATOR_DISCONNECTED,
    "robot_disconnected": pb.RELEASE_REASON_ROBOT_DISCONNECTED,
    "preempted": pb.RELEASE_REASON_PREEMPTED,
}


# The safety filter's decision (policies/safety/filter.py names it) as Signals.safety_filter.
_SAFETY_FILTER_DECISIONS = {
    "off": pb.SAFETY_FILTER_DECISION_OFF,
    "pass": pb.SAFETY_FILTER_DECISION_PASS,
    "switched": pb.SAFETY_FILTER_DECISION_SWITCHED,
    "hold": pb.SAFETY_FILTER_DECISION_HOLD,
}


def label_to_wire(label: ControlLabel | str | int) -> int:
    """A store label (or its name) as the wire's ControlLabel value."""
    return _LABEL_TO_WIRE[ControlLabel.parse(label)]


def label_from_wire(value: int) -> ControlLabel:
    """The wire's ControlLabel as a store label; ValueError for UNSPECIFIED or an unknown value."""
    label = _LABEL_FROM_WIRE.get(value)
    if label is None:
        name = "CONTROL_LABEL_UNSPECIFIED (no label set)" if value == 0 else f"unknown value {value}"
        valid = ", ".join(pb.ControlLabel.Name(wire) for wire in _LABEL_FROM_WIRE)
        raise ValueError(f"control label is {name}; a step must carry one of {valid}")
    return label


def assignment_reason_to_wire(reason: str | None) -> int:
    return _ASSIGNMENT_REASONS.get(reason or "", pb.ASSIGNMENT_REASON_UNSPECIFIED)


def assignment_reason_name(value: int) -> str:
    """The allocator's reason string for a wire AssignmentReason ('' when unspecified)."""
    return next((name for name, wire in _ASSIGNMENT_REASONS.items() if wire == value), "")


def release_reason_to_wire(reason: str | None) -> int:
    return _RELEASE_REASONS.get(reason or "", pb.RELEASE_REASON_UNSPECIFIED)


def release_reason_name(value: int) -> str:
    """The allocator's reason string for a wire ReleaseReason ('' when unspecified)."""
    return next((name for name, wire in _RELEASE_REASONS.items() if wire == value), "")


def safety_filter_to_wire(decision: str | None) -> int | None:
    """The filter's decision as the wire's SafetyFilterDecision; None for no (or an unknown) decision."""
    return _SAFETY_FILTER_DECISIONS.get(decision or "")


def safety_filter_name(value: int) -> str:
    """The filter's decision for a wire SafetyFilterDecision ('' when unspecified or unknown)."""
    return next((name for name, wire in _SAFETY_FILTER_DECISIONS.items() if wire == value), "")


def error_code_to_wire(status_name: str) -> int:
    """A gRPC status code name ("PERMISSION_DENIED") as the wire's ErrorCode."""
    return (
        pb.ErrorCode.Value(f"ERROR_CODE_{status_name}")
        if f"ERROR_CODE_{status_name}" in pb.ErrorCode.keys()
        else pb.ERROR_CODE_UNSPECIFIED
    )
