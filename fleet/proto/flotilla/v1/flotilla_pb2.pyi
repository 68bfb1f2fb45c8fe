from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ControlLabel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROL_LABEL_UNSPECIFIED: _ClassVar[ControlLabel]
    CONTROL_LABEL_DEMO: _ClassVar[ControlLabel]
    CONTROL_LABEL_ROBOT: _ClassVar[ControlLabel]
    CONTROL_LABEL_PRE_INTERVENTION: _ClassVar[ControlLabel]
    CONTROL_LABEL_INTERVENTION: _ClassVar[ControlLabel]

class SafetyFilterDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAFETY_FILTER_DECISION_UNSPECIFIED: _ClassVar[SafetyFilterDecision]
    SAFETY_FILTER_DECISION_OFF: _ClassVar[SafetyFilterDecision]
    SAFETY_FILTER_DECISION_PASS: _ClassVar[SafetyFilterDecision]
    SAFETY_FILTER_DECISION_SWITCHED: _ClassVar[SafetyFilterDecision]
    SAFETY_FILTER_DECISION_HOLD: _ClassVar[SafetyFilterDecision]

class AssignmentReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASSIGNMENT_REASON_UNSPECIFIED: _ClassVar[AssignmentReason]
    ASSIGNMENT_REASON_CONSTRAINT_VIOLATION: _ClassVar[AssignmentReason]
    ASSIGNMENT_REASON_UNCERTAINTY: _ClassVar[AssignmentReason]
    ASSIGNMENT_REASON_RISK: _ClassVar[AssignmentReason]
    ASSIGNMENT_REASON_RANDOM: _ClassVar[AssignmentReason]
    ASSIGNMENT_REASON_DENSITY: _ClassVar[AssignmentReason]

class ReleaseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEASE_REASON_UNSPECIFIED: _ClassVar[ReleaseReason]
    RELEASE_REASON_OPERATOR_RELEASE: _ClassVar[ReleaseReason]
    RELEASE_REASON_NO_LONGER_NEEDED: _ClassVar[ReleaseReason]
    RELEASE_REASON_RESET_DONE: _ClassVar[ReleaseReason]
    RELEASE_REASON_OPERATOR_DISCONNECTED: _ClassVar[ReleaseReason]
    RELEASE_REASON_ROBOT_DISCONNECTED: _ClassVar[ReleaseReason]
    RELEASE_REASON_PREEMPTED: _ClassVar[ReleaseReason]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_AUTONOMOUS: _ClassVar[Mode]
    MODE_TELEOP: _ClassVar[Mode]
    MODE_HOLD: _ClassVar[Mode]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_PERMISSION_DENIED: _ClassVar[ErrorCode]
    ERROR_CODE_FAILED_PRECONDITION: _ClassVar[ErrorCode]
    ERROR_CODE_RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
CONTROL_LABEL_UNSPECIFIED: ControlLabel
CONTROL_LABEL_DEMO: ControlLabel
CONTROL_LABEL_ROBOT: ControlLabel
CONTROL_LABEL_PRE_INTERVENTION: ControlLabel
CONTROL_LABEL_INTERVENTION: ControlLabel
SAFETY_FILTER_DECISION_UNSPECIFIED: SafetyFilterDecision
SAFETY_FILTER_DECISION_OFF: SafetyFilterDecision
SAFETY_FILTER_DECISION_PASS: SafetyFilterDecision
SAFETY_FILTER_DECISION_SWITCHED: SafetyFilterDecision
SAFETY_FILTER_DECISION_HOLD: SafetyFilterDecision
ASSIGNMENT_REASON_UNSPECIFIED: AssignmentReason
ASSIGNMENT_REASON_CONSTRAINT_VIOLATION: AssignmentReason
ASSIGNMENT_REASON_UNCERTAINTY: AssignmentReason
ASSIGNMENT_REASON_RISK: AssignmentReason
ASSIGNMENT_REASON_RANDOM: AssignmentReason
ASSIGNMENT_REASON_DENSITY: AssignmentReason
RELEASE_REASON_UNSPECIFIED: ReleaseReason
RELEASE_REASON_OPERATOR_RELEASE: ReleaseReason
RELEASE_REASON_NO_LONGER_NEEDED: ReleaseReason
RELEASE_REASON_RESET_DONE: ReleaseReason
RELEASE_REASON_OPERATOR_DISCONNECTED: ReleaseReason
RELEASE_REASON_ROBOT_DISCONNECTED: ReleaseReason
RELEASE_REASON_PREEMPTED: ReleaseReason
MODE_UNSPECIFIED: Mode
MODE_AUTONOMOUS: Mode
MODE_TELEOP: Mode
MODE_HOLD: Mode
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_NOT_FOUND: ErrorCode
ERROR_CODE_PERMISSION_DENIED: ErrorCode
ERROR_CODE_FAILED_PRECONDITION: ErrorCode
ERROR_CODE_RESOURCE_EXHAUSTED: ErrorCode

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoding", "data", "width", "height")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    data: bytes
    width: int
    height: int
    def __init__(self, encoding: _Optional[str] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Signals(_message.Message):
    __slots__ = ("uncertainty", "risk", "density", "constraint_violation", "novelty", "rnd", "ldm", "agree", "safety_filter")
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_VIOLATION_FIELD_NUMBER: _ClassVar[int]
    NOVELTY_FIELD_NUMBER: _ClassVar[int]
    RND_FIELD_NUMBER: _ClassVar[int]
    LDM_FIELD_NUMBER: _ClassVar[int]
    AGREE_FIELD_NUMBER: _ClassVar[int]
    SAFETY_FILTER_FIELD_NUMBER: _ClassVar[int]
    uncertainty: float
    risk: float
    density: float
    constraint_violation: bool
    novelty: float
    rnd: float
    ldm: float
    agree: float
    safety_filter: SafetyFilterDecision
    def __init__(self, uncertainty: _Optional[float] = ..., risk: _Optional[float] = ..., density: _Optional[float] = ..., constraint_violation: _Optional[bool] = ..., novelty: _Optional[float] = ..., rnd: _Optional[float] = ..., ldm: _Optional[float] = ..., agree: _Optional[float] = ..., safety_filter: _Optional[_Union[SafetyFilterDecision, str]] = ...) -> None: ...

class RobotHello(_message.Message):
    __slots__ = ("robot_id", "task", "policy_version", "observation_spec", "action_dim", "goal_dim", "last_acked_seq", "boot_id")
    class ObservationSpecEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TensorSpec
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SPEC_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    GOAL_DIM_FIELD_NUMBER: _ClassVar[int]
    LAST_ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    task: str
    policy_version: str
    observation_spec: _containers.MessageMap[str, TensorSpec]
    action_dim: int
    goal_dim: int
    last_acked_seq: int
    boot_id: str
    def __init__(self, robot_id: _Optional[str] = ..., task: _Optional[str] = ..., policy_version: _Optional[str] = ..., observation_spec: _Optional[_Mapping[str, TensorSpec]] = ..., action_dim: _Optional[int] = ..., goal_dim: _Optional[int] = ..., last_acked_seq: _Optional[int] = ..., boot_id: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("shape", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("seq", "episode_id", "t", "timestamp", "observation", "goal", "action", "label", "signals", "policy_version", "camera", "operator_id", "operator_action_seq")
    class ObservationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAMERA_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_ACTION_SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    episode_id: int
    t: int
    timestamp: float
    observation: _containers.MessageMap[str, Tensor]
    goal: Tensor
    action: Tensor
    label: ControlLabel
    signals: Signals
    policy_version: str
    camera: Image
    operator_id: str
    operator_action_seq: int
    def __init__(self, seq: _Optional[int] = ..., episode_id: _Optional[int] = ..., t: _Optional[int] = ..., timestamp: _Optional[float] = ..., observation: _Optional[_Mapping[str, Tensor]] = ..., goal: _Optional[_Union[Tensor, _Mapping]] = ..., action: _Optional[_Union[Tensor, _Mapping]] = ..., label: _Optional[_Union[ControlLabel, str]] = ..., signals: _Optional[_Union[Signals, _Mapping]] = ..., policy_version: _Optional[str] = ..., camera: _Optional[_Union[Image, _Mapping]] = ..., operator_id: _Optional[str] = ..., operator_action_seq: _Optional[int] = ...) -> None: ...

class EpisodeStart(_message.Message):
    __slots__ = ("episode_id", "goal", "policy_version", "timestamp", "seq")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    episode_id: int
    goal: Tensor
    policy_version: str
    timestamp: float
    seq: int
    def __init__(self, episode_id: _Optional[int] = ..., goal: _Optional[_Union[Tensor, _Mapping]] = ..., policy_version: _Optional[str] = ..., timestamp: _Optional[float] = ..., seq: _Optional[int] = ...) -> None: ...

class EpisodeEnd(_message.Message):
    __slots__ = ("episode_id", "success", "outcome", "timestamp", "seq")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    episode_id: int
    success: bool
    outcome: str
    timestamp: float
    seq: int
    def __init__(self, episode_id: _Optional[int] = ..., success: _Optional[bool] = ..., outcome: _Optional[str] = ..., timestamp: _Optional[float] = ..., seq: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RobotMessage(_message.Message):
    __slots__ = ("hello", "episode_start", "step", "episode_end", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    EPISODE_START_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPISODE_END_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: RobotHello
    episode_start: EpisodeStart
    step: Step
    episode_end: EpisodeEnd
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[RobotHello, _Mapping]] = ..., episode_start: _Optional[_Union[EpisodeStart, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., episode_end: _Optional[_Union[EpisodeEnd, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("ack_seq", "mode", "action", "operator_id", "reset", "policy_version", "estop", "message", "committed_seq", "action_seq", "input_stopped")
    ACK_SEQ_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ESTOP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    ACTION_SEQ_FIELD_NUMBER: _ClassVar[int]
    INPUT_STOPPED_FIELD_NUMBER: _ClassVar[int]
    ack_seq: int
    mode: Mode
    action: Tensor
    operator_id: str
    reset: bool
    policy_version: str
    estop: bool
    message: str
    committed_seq: int
    action_seq: int
    input_stopped: bool
    def __init__(self, ack_seq: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., action: _Optional[_Union[Tensor, _Mapping]] = ..., operator_id: _Optional[str] = ..., reset: _Optional[bool] = ..., policy_version: _Optional[str] = ..., estop: _Optional[bool] = ..., message: _Optional[str] = ..., committed_seq: _Optional[int] = ..., action_seq: _Optional[int] = ..., input_stopped: _Optional[bool] = ...) -> None: ...

class OperatorHello(_message.Message):
    __slots__ = ("operator_id", "boot_id")
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    operator_id: str
    boot_id: str
    def __init__(self, operator_id: _Optional[str] = ..., boot_id: _Optional[str] = ...) -> None: ...

class OperatorAction(_message.Message):
    __slots__ = ("robot_id", "action", "seq", "frame_seq", "frame_age_ms")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FRAME_SEQ_FIELD_NUMBER: _ClassVar[int]
    FRAME_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    action: Tensor
    seq: int
    frame_seq: int
    frame_age_ms: float
    def __init__(self, robot_id: _Optional[str] = ..., action: _Optional[_Union[Tensor, _Mapping]] = ..., seq: _Optional[int] = ..., frame_seq: _Optional[int] = ..., frame_age_ms: _Optional[float] = ...) -> None: ...

class OperatorMessage(_message.Message):
    __slots__ = ("hello", "action", "release", "estop", "reset", "heartbeat", "discard", "note", "pick")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ESTOP_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DISCARD_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    PICK_FIELD_NUMBER: _ClassVar[int]
    hello: OperatorHello
    action: OperatorAction
    release: Release
    estop: EStop
    reset: ResetRobot
    heartbeat: Heartbeat
    discard: DiscardCorrection
    note: InterventionNote
    pick: PickRobot
    def __init__(self, hello: _Optional[_Union[OperatorHello, _Mapping]] = ..., action: _Optional[_Union[OperatorAction, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., estop: _Optional[_Union[EStop, _Mapping]] = ..., reset: _Optional[_Union[ResetRobot, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., discard: _Optional[_Union[DiscardCorrection, _Mapping]] = ..., note: _Optional[_Union[InterventionNote, _Mapping]] = ..., pick: _Optional[_Union[PickRobot, _Mapping]] = ...) -> None: ...

class DiscardCorrection(_message.Message):
    __slots__ = ("robot_id",)
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    def __init__(self, robot_id: _Optional[str] = ...) -> None: ...

class InterventionNote(_message.Message):
    __slots__ = ("robot_id", "text")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    text: str
    def __init__(self, robot_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class PickRobot(_message.Message):
    __slots__ = ("robot_id",)
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    def __init__(self, robot_id: _Optional[str] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("robot_id", "reason")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    reason: ReleaseReason
    def __init__(self, robot_id: _Optional[str] = ..., reason: _Optional[_Union[ReleaseReason, str]] = ...) -> None: ...

class EStop(_message.Message):
    __slots__ = ("robot_id", "engage")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    ENGAGE_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    engage: bool
    def __init__(self, robot_id: _Optional[str] = ..., engage: _Optional[bool] = ...) -> None: ...

class ResetRobot(_message.Message):
    __slots__ = ("robot_id",)
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    def __init__(self, robot_id: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("robot_id", "min_steps", "needs_reset", "reset_steps", "reason")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_RESET_FIELD_NUMBER: _ClassVar[int]
    RESET_STEPS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    min_steps: int
    needs_reset: bool
    reset_steps: int
    reason: AssignmentReason
    def __init__(self, robot_id: _Optional[str] = ..., min_steps: _Optional[int] = ..., needs_reset: _Optional[bool] = ..., reset_steps: _Optional[int] = ..., reason: _Optional[_Union[AssignmentReason, str]] = ...) -> None: ...

class RobotFrame(_message.Message):
    __slots__ = ("robot_id", "seq", "camera", "observation", "signals", "mode", "goal", "timestamp", "action_seq")
    class ObservationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CAMERA_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ACTION_SEQ_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    seq: int
    camera: Image
    observation: _containers.MessageMap[str, Tensor]
    signals: Signals
    mode: Mode
    goal: Tensor
    timestamp: float
    action_seq: int
    def __init__(self, robot_id: _Optional[str] = ..., seq: _Optional[int] = ..., camera: _Optional[_Union[Image, _Mapping]] = ..., observation: _Optional[_Mapping[str, Tensor]] = ..., signals: _Optional[_Union[Signals, _Mapping]] = ..., mode: _Optional[_Union[Mode, str]] = ..., goal: _Optional[_Union[Tensor, _Mapping]] = ..., timestamp: _Optional[float] = ..., action_seq: _Optional[int] = ...) -> None: ...

class QueueEntry(_message.Message):
    __slots__ = ("robot_id", "priority", "assigned_to", "reason", "score", "waited_s")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_TO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    WAITED_S_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    priority: float
    assigned_to: str
    reason: AssignmentReason
    score: float
    waited_s: float
    def __init__(self, robot_id: _Optional[str] = ..., priority: _Optional[float] = ..., assigned_to: _Optional[str] = ..., reason: _Optional[_Union[AssignmentReason, str]] = ..., score: _Optional[float] = ..., waited_s: _Optional[float] = ...) -> None: ...

class Queue(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[QueueEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[QueueEntry, _Mapping]]] = ...) -> None: ...

class OperatorError(_message.Message):
    __slots__ = ("code", "message", "robot_id", "request")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    robot_id: str
    request: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., robot_id: _Optional[str] = ..., request: _Optional[str] = ...) -> None: ...

class OperatorNotice(_message.Message):
    __slots__ = ("request", "robot_id", "message")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request: str
    robot_id: str
    message: str
    def __init__(self, request: _Optional[str] = ..., robot_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class OperatorUpdate(_message.Message):
    __slots__ = ("assignment", "released", "frame", "queue", "error", "notice")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    released: Release
    frame: RobotFrame
    queue: Queue
    error: OperatorError
    notice: OperatorNotice
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., released: _Optional[_Union[Release, _Mapping]] = ..., frame: _Optional[_Union[RobotFrame, _Mapping]] = ..., queue: _Optional[_Union[Queue, _Mapping]] = ..., error: _Optional[_Union[OperatorError, _Mapping]] = ..., notice: _Optional[_Union[OperatorNotice, _Mapping]] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("version", "filename", "data", "offset", "last", "sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    version: str
    filename: str
    data: bytes
    offset: int
    last: bool
    sha256: str
    def __init__(self, version: _Optional[str] = ..., filename: _Optional[str] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., last: _Optional[bool] = ..., sha256: _Optional[str] = ...) -> None: ...

class PublishResult(_message.Message):
    __slots__ = ("version", "bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    bytes: int
    def __init__(self, version: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyVersions(_message.Message):
    __slots__ = ("versions", "latest", "damaged")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[str]
    latest: str
    damaged: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, versions: _Optional[_Iterable[str]] = ..., latest: _Optional[str] = ..., damaged: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RobotStatus(_message.Message):
    __slots__ = ("robot_id", "mode", "operator_id", "policy_version", "steps", "episodes", "signals", "connected", "estop", "blocked", "task", "goal", "action_dim")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ESTOP_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    mode: Mode
    operator_id: str
    policy_version: str
    steps: int
    episodes: int
    signals: Signals
    connected: bool
    estop: bool
    blocked: bool
    task: str
    goal: Tensor
    action_dim: int
    def __init__(self, robot_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., operator_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., steps: _Optional[int] = ..., episodes: _Optional[int] = ..., signals: _Optional[_Union[Signals, _Mapping]] = ..., connected: _Optional[bool] = ..., estop: _Optional[bool] = ..., blocked: _Optional[bool] = ..., task: _Optional[str] = ..., goal: _Optional[_Union[Tensor, _Mapping]] = ..., action_dim: _Optional[int] = ...) -> None: ...

class OperatorTally(_message.Message):
    __slots__ = ("operator_id", "interventions", "control_s", "intervention_steps", "discarded")
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_S_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    operator_id: str
    interventions: int
    control_s: float
    intervention_steps: int
    discarded: int
    def __init__(self, operator_id: _Optional[str] = ..., interventions: _Optional[int] = ..., control_s: _Optional[float] = ..., intervention_steps: _Optional[int] = ..., discarded: _Optional[int] = ...) -> None: ...

class PolicyRound(_message.Message):
    __slots__ = ("policy_version", "episodes", "successes", "autonomous_successes", "steps", "human_steps", "human_s")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    AUTONOMOUS_SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    HUMAN_STEPS_FIELD_NUMBER: _ClassVar[int]
    HUMAN_S_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    episodes: int
    successes: int
    autonomous_successes: int
    steps: int
    human_steps: int
    human_s: float
    def __init__(self, policy_version: _Optional[str] = ..., episodes: _Optional[int] = ..., successes: _Optional[int] = ..., autonomous_successes: _Optional[int] = ..., steps: _Optional[int] = ..., human_steps: _Optional[int] = ..., human_s: _Optional[float] = ...) -> None: ...

class FleetStatus(_message.Message):
    __slots__ = ("robots", "operators", "episodes_committed", "steps_logged", "writer_queue_depth", "fleet_estop", "writer_healthy", "writer_error", "tallies", "rounds")
    ROBOTS_FIELD_NUMBER: _ClassVar[int]
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    EPISODES_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    STEPS_LOGGED_FIELD_NUMBER: _ClassVar[int]
    WRITER_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    FLEET_ESTOP_FIELD_NUMBER: _ClassVar[int]
    WRITER_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    WRITER_ERROR_FIELD_NUMBER: _ClassVar[int]
    TALLIES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    robots: _containers.RepeatedCompositeFieldContainer[RobotStatus]
    operators: _containers.RepeatedScalarFieldContainer[str]
    episodes_committed: int
    steps_logged: int
    writer_queue_depth: int
    fleet_estop: bool
    writer_healthy: bool
    writer_error: str
    tallies: _containers.RepeatedCompositeFieldContainer[OperatorTally]
    rounds: _containers.RepeatedCompositeFieldContainer[PolicyRound]
    def __init__(self, robots: _Optional[_Iterable[_Union[RobotStatus, _Mapping]]] = ..., operators: _Optional[_Iterable[str]] = ..., episodes_committed: _Optional[int] = ..., steps_logged: _Optional[int] = ..., writer_queue_depth: _Optional[int] = ..., fleet_estop: _Optional[bool] = ..., writer_healthy: _Optional[bool] = ..., writer_error: _Optional[str] = ..., tallies: _Optional[_Iterable[_Union[OperatorTally, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[PolicyRound, _Mapping]]] = ...) -> None: ...
