"""ROS 2 topics over DDS without a ROS install (cyclonedds' Python binding): what rmw_cyclonedds_cpp puts on
the wire, so a robot computer without ROS runs the same agent, and ROS 2 nodes see its topics.

What ROS 2 (Jazzy) does, reproduced here:
- topic `/a/b` is the DDS topic `rt/a/b`; message `pkg/msg/T` is the DDS type `pkg::msg::dds_::T_`;
- samples are XCDR1 (plain CDR, little endian, 4-byte encapsulation header), structures as in the .msg;
- QoS profiles: default (reliable, volatile, keep last 10), sensor data (best effort, volatile, keep last
  5), latched (reliable, transient local, keep last 1);
- each reader and writer carries `typehash=RIHS01_<sha256>;` in its USER_DATA (Jazzy's type hash, which
  rosbags computes from the message definition): Jazzy nodes compare it when matching.

The IDL types are generated from rosbags' ROS 2 Jazzy message definitions (one source of the message
layouts for the rosbag2 import, the tests and this wire); cyclonedds serializes what is sent, rosbags
decodes what is received (into its dataclasses, with the ROS field names), and each received sample
keeps the bytes it arrived as (`wire_bytes(sample)`): a test compares them with rosbags' serialization.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from cyclonedds.builtin import BuiltinDataReader, BuiltinTopicDcpsPublication
from cyclonedds.core import InstanceState, Listener, Qos, ReadCondition, SampleState, ViewState
from cyclonedds.domain import Domain, DomainParticipant
from cyclonedds.idl import IdlStruct, make_idl_struct
from cyclonedds.idl import types as t
from cyclonedds.internal import InvalidSample
from cyclonedds.pub import DataWriter
from cyclonedds.qos import Policy
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic

log = logging.getLogger(__name__)

# rosbags base type -> cyclonedds IDL type (string is handled apart: bounded or not).
_BASE = {
    "bool": bool,
    "byte": t.byte,
    "char": t.uint8,  # ROS 2 `char` is uint8
    "int8": t.int8,
    "uint8": t.uint8,
    "int16": t.int16,
    "uint16": t.uint16,
    "int32": t.int32,
    "uint32": t.uint32,
    "int64": t.int64,
    "uint64": t.uint64,
    "float32": t.float32,
    "float64": t.float64,
}

# One loopback-only domain configuration (tests, benchmarks, a robot computer talking to itself):
# no multicast, unicast discovery to 127.0.0.1.
LOOPBACK_CONFIG = """<CycloneDDS><Domain id="any"><General>
<Interfaces><NetworkInterface address="127.0.0.1"/></Interfaces><AllowMulticast>false</AllowMulticast>
</General><Discovery><ParticipantIndex>auto</ParticipantIndex><MaxAutoParticipantIndex>30</MaxAutoParticipantIndex>
<Peers><Peer address="127.0.0.1"/></Peers></Discovery></Domain></CycloneDDS>"""


def _decoder(ros_type: str):
    """The received samples' deserialize: rosbags decodes them into its dataclasses (numpy arrays; a
    640x480 rgb8 Image in ~0.4 ms, where cyclonedds' Python decoder took ~17 ms and gave a list of ints
    that took ~27 ms more to convert), and each keeps the bytes it arrived as."""

    def deserialize(cls, data: bytes, has_header: bool = True, use_version_2=None):
        sample = _typestore().deserialize_cdr(data, ros_type)
        sample._wire_bytes = data
        return sample

    return classmethod(deserialize)


def wire_bytes(sample) -> bytes:
    """The bytes a received sample arrived as (encapsulation header + CDR)."""
    return sample._wire_bytes


@functools.cache
def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_JAZZY)


def dds_type_name(ros_type: str) -> str:
    """ "sensor_msgs/msg/Image" -> "sensor_msgs::msg::dds_::Image_" (rmw's naming)."""
    package, kind, name = ros_type.split("/")
    return f"{package}::{kind}::dds_::{name}_"


def type_hash(ros_type: str) -> str:
    """Jazzy's RIHS01 type hash of a message type."""
    return _typestore().hash_rihs01(ros_type)


@functools.cache
def idl_type(ros_type: str) -> type[IdlStruct]:
    """The cyclonedds struct for a ROS 2 message type, built from its Jazzy definition."""
    _constants, fielddefs = _typestore().fielddefs[ros_type]
    cls = make_idl_struct(
        ros_type.rsplit("/", 1)[1] + "_",
        dds_type_name(ros_type),
        {name: _idl_field(desc) for name, desc in fielddefs},
    )
    cls.deserialize = _decoder(ros_type)  # (a base class would join the XTypes type information)
    return cls


def _idl_field(desc) -> Any:
    kind, rest = desc
    if kind.name == "BASE":
        name, bound = rest
        if name == "string":
            return t.bounded_str[bound] if bound else str
        if name not in _BASE:
            raise ValueError(f"ROS base type {name!r} is not supported on the DDS transport")
        return _BASE[name]
    if kind.name == "NAME":
        return idl_type(rest)
    element, size = rest
    if kind.name == "ARRAY":
        return t.array[_idl_field(element), size]
    return t.sequence[_idl_field(element), size] if size else t.sequence[_idl_field(element)]


def to_idl(msg, ros_type: str):
    """Any message with the ROS field names (a rosbags dataclass, one built by fleet.ros2.messages) ->
    the cyclonedds struct; numpy arrays become the sequences cyclonedds serializes (bytes for uint8[])."""
    cls = idl_type(ros_type)
    _constants, fielddefs = _typestore().fielddefs[ros_type]
    values = {}
    for name, (kind, rest) in fielddefs:
        value = getattr(msg, name)
        if kind.name == "NAME":
            value = to_idl(value, rest)
        elif kind.name in ("ARRAY", "SEQUENCE"):
            element_kind, element = rest[0]
            if element_kind.name == "NAME":
                value = [to_idl(item, element) for item in value]
            elif element[0] in ("uint8", "byte", "char"):
                value = bytes(np.asarray(value, np.uint8)) if isinstance(value, np.ndarray) else bytes(value)
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            else:
                value = list(value)
        values[name] = value
    return cls(**values)


# -- QoS (rclpy's profiles) --------------------------------------------------------------------------------

QOS_PROFILES = ("default", "sensor_data", "latched")
WARNING_INTERVAL_S = 5.0  # a topic whose messages keep failing is reported at most this often


def ros_qos(profile: str, ros_type: str) -> Qos:
    if profile not in QOS_PROFILES:
        raise ValueError(f"QoS profile {profile!r}: use one of {', '.join(QOS_PROFILES)}")
    policies = {
        "default": [Policy.Reliability.Reliable(max_blocking_time=100_000_000), Policy.Durability.Volatile],
        "sensor_data": [Policy.Reliability.BestEffort, Policy.Durability.Volatile],
        "latched": [
            Policy.Reliability.Reliable(max_blocking_time=100_000_000),
            Policy.Durability.TransientLocal,
        ],
    }[profile]
    depth = {"default": 10, "sensor_data": 5, "latched": 1}[profile]
    return Qos(
        *policies,
        Policy.History.KeepLast(depth),
        Policy.DataRepresentation(use_cdrv0_representation=True),  # XCDR1, as rmw_cyclonedds
        Policy.Userdata(f"typehash={type_hash(ros_type)};".encode()),
    )


def dds_topic_name(topic: str) -> str:
    """ "/joint_states" -> "rt/joint_states"; a relative name is taken from the root namespace."""
    if not topic or topic.startswith("~"):
        raise ValueError(f"topic {topic!r}: resolve private names (~/...) before asking for DDS names")
    return "rt/" + topic.lstrip("/")


def free_domain_id() -> int:
    """A DDS domain id for this process's tests (1..200): parallel runs on one machine do not meet."""
    return 1 + os.getpid() % 200


_DOMAINS: dict[int, tuple[Domain, str]] = {}
_DOMAINS_LOCK = threading.Lock()


def _configured_domain(domain_id: int, config: str) -> None:
    """Create domain `domain_id` with `config` (instead of $CYCLONEDDS_URI's), once per process: cyclonedds
    refuses a second one; a different config for the same domain is an error."""
    with _DOMAINS_LOCK:
        if domain_id in _DOMAINS:
            if _DOMAINS[domain_id][1] != config:
                raise ValueError(f"DDS domain {domain_id} already runs with another configuration here")
            return
        _DOMAINS[domain_id] = (Domain(domain_id, config), config)


@atexit.register
def _delete_domains() -> None:
    """Delete the configured domains at exit while every thread can still run: left to the interpreter's
    finalization, a domain's teardown waited on cyclonedds threads that could no longer take the GIL, and
    `flotilla robot` hung after Ctrl-C (1 exit in 4-6)."""
    with _DOMAINS_LOCK:
        domains = [domain for domain, _ in _DOMAINS.values()]
        _DOMAINS.clear()
    for domain in domains:
        domain.__del__()  # cyclonedds' Entity deletes once (later calls are no-ops)


class DdsTransport:
    """One DDS participant: publishers and subscriptions on ROS 2 topics. Callbacks run on cyclonedds'
    listener threads; keep them short (the node's logic converts and stores, the timer does the rest)."""

    def __init__(self, domain_id: int = 0, config: str | None = None):
        if config:
            _configured_domain(domain_id, config)
        self.participant = DomainParticipant(domain_id)
        self._topics: dict[str, Topic] = {}
        self._entities: list = []
        self._listeners: list[Listener] = []
        self._publications = None
        self._lock = threading.Lock()

    def _topic(self, topic: str, ros_type: str) -> Topic:
        name = dds_topic_name(topic)
        with self._lock:
            if name not in self._topics:
                self._topics[name] = Topic(self.participant, name, idl_type(ros_type))
            return self._topics[name]

    def publisher(self, topic: str, ros_type: str, qos: str = "default") -> Callable[[Any], None]:
        """publish(msg) for `topic` (msg: any object with the ROS fields)."""
        writer = DataWriter(self.participant, self._topic(topic, ros_type), qos=ros_qos(qos, ros_type))
        self._entities.append(writer)

        def publish(msg) -> None:
            writer.write(msg if isinstance(msg, IdlStruct) else to_idl(msg, ros_type))

        publish.writer = writer
        return publish

    def subscribe(self, topic: str, ros_type: str, callback: Callable[[Any], None], qos: str = "default"):
        """callback(sample) for every sample (a cyclonedds struct with the ROS field names)."""

        last_warning = [-WARNING_INTERVAL_S]

        def on_data_available(reader) -> None:
            # None: fired while the reader is being deleted. No topic yet: fired (a publisher already
            # sending) before cyclonedds' DataReader.__init__ set it, where take() fails; subscribe()
            # takes those samples once the reader is built. (Attaching the listener afterwards instead,
            # set_listener calls it at once under cyclonedds' lock: a deadlock with a writer in this process.)
            if reader is None or getattr(reader, "_topic", None) is None:
                return
            for sample in reader.take(N=64):
                if isinstance(sample, InvalidSample):  # a writer went away: no data
                    continue
                try:
                    callback(sample)
                except Exception as err:  # a bad message must not kill the listener thread
                    now = time.monotonic()
                    if now - last_warning[0] >= WARNING_INTERVAL_S:  # sensors at 100 Hz: no flood
                        last_warning[0] = now
                        log.warning("DDS %s: %s: %s", topic, type(err).__name__, err)

        listener = Listener(on_data_available=on_data_available)
        reader = DataReader(
            self.participant, self._topic(topic, ros_type), qos=ros_qos(qos, ros_type), listener=listener
        )
        self._entities.append(reader)
        self._listeners.append(listener)  # ctypes callbacks must outlive the reader
        on_data_available(reader)  # what arrived while cyclonedds was still building the reader
        return reader

    def discovered_publications(self) -> list:
        """The writers this participant has discovered and that are still there (DCPSPublication samples:
        key, topic_name, type_name and qos, USER_DATA included): what any ROS 2 node on the network sees."""
        if self._publications is None:
            self._publications = BuiltinDataReader(self.participant, BuiltinTopicDcpsPublication)
            self._alive = ReadCondition(
                self._publications, SampleState.Any | ViewState.Any | InstanceState.Alive
            )
            self._entities += [self._alive, self._publications]  # deleted in this order
        samples = self._publications.read(N=10_000, condition=self._alive)
        return [s for s in samples if hasattr(s, "topic_name")]

    def other_writers(self, topic: str, publish) -> int:
        """How many writers other than `publish`'s (one of this transport's publishers) are on `topic`."""
        name, own = dds_topic_name(topic), publish.writer.guid
        return sum(1 for s in self.discovered_publications() if s.topic_name == name and s.key != own)

    def close(self) -> None:
        """Delete readers (listeners detached first), writers, topics, then the participant, in that order:
        left to the garbage collector, a listener's callback can fire into a freed reader (a crash)."""
        if self.participant is None:
            return
        for entity in self._entities:
            if isinstance(entity, DataReader):
                entity.set_listener(None)
        for entity in [*self._entities, *self._topics.values(), self.participant]:
            entity.__del__()  # cyclonedds' Entity deletes once (later calls are no-ops)
        self._entities, self._topics, self._listeners, self.participant = [], {}, [], None
        self._publications = None

    def __enter__(self) -> DdsTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
