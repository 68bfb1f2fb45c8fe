"""The v1 protocol is frozen: `buf lint` and `buf breaking` guard fleet/proto/flotilla/v1/flotilla.proto.

The baseline is the committed buf image fleet/proto/flotilla_v1.binpb (scripts/freeze_proto.sh builds
it); fleet/proto/buf.yaml holds the lint and breaking rules. buf comes from package.json (pinned) and
scripts/setup.sh installs it: a missing buf fails these tests, it never skips them.
"""

import difflib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from fleet.proto import PROTO_FILE, flotilla_pb2

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "fleet" / "proto"  # the buf module root (buf.yaml)
IMAGE = MODULE / "flotilla_v1.binpb"
PROTO_IN_MODULE = Path(PROTO_FILE).relative_to("fleet/proto")  # flotilla/v1/flotilla.proto
BUF = ROOT / "node_modules" / ".bin" / "buf"


def buf(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if not BUF.exists():
        pytest.fail(f"buf is not installed ({BUF.relative_to(ROOT)} is missing): run scripts/setup.sh")
    return subprocess.run([str(BUF), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def breaking(module: Path) -> subprocess.CompletedProcess:
    return buf("breaking", module, "--against", IMAGE)


def module_copy(tmp_path: Path, edit=None) -> Path:
    """A copy of the buf module (buf.yaml and the .proto) with `edit` applied to the .proto's text."""
    module = tmp_path / "module"
    (module / PROTO_IN_MODULE).parent.mkdir(parents=True)
    shutil.copy(MODULE / "buf.yaml", module / "buf.yaml")
    text = (MODULE / PROTO_IN_MODULE).read_text()
    if edit is not None:
        edited = edit(text)
        assert edited != text, "the edit did not apply: update this test to the .proto"
        text = edited
    (module / PROTO_IN_MODULE).write_text(text)
    return module


def in_message(message: str, old: str, new: str):
    """An edit replacing the regex `old` inside `message Name { ... }` only."""

    def edit(text: str) -> str:
        block = re.search(rf"^message {message} \{{.*?^\}}", text, flags=re.M | re.S)
        assert block, f"message {message} is not in the .proto"
        changed = re.sub(old, new, block.group(0), count=1, flags=re.M)
        return text[: block.start()] + changed + text[block.end() :]

    return edit


def test_buf_lint_passes():
    result = buf("lint", MODULE)
    assert result.returncode == 0, f"buf lint fleet/proto:\n{result.stdout}{result.stderr}"


def test_no_breaking_change_against_the_frozen_image():
    result = breaking(MODULE)
    assert result.returncode == 0, (
        f"breaking change against the frozen v1 image:\n{result.stdout}{result.stderr}\n"
        "Add fields and messages; never renumber, retype or remove one (reserve it instead)."
    )


def test_the_guard_accepts_an_unchanged_copy_and_an_added_field(tmp_path):
    # The controls for the next test: a failure there comes from the edit, not from the temp copy.
    assert breaking(module_copy(tmp_path / "same")).returncode == 0
    added = in_message("CheckpointChunk", r"^\}", "  int64 added_for_test = 99;\n}")
    result = breaking(module_copy(tmp_path / "added", added))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "edit", "expected"),
    [
        (
            "renumbered field",
            in_message("CheckpointChunk", r"string sha256 = 6;", "string sha256 = 7;"),
            "sha256",
        ),
        ("removed field", in_message("Command", r"^\s*bool estop = 7;.*\n", ""), "estop"),
        ("retyped field", in_message("Step", r"int32 t = 3;", "int64 t = 3;"), '"t"'),
        ("removed message", lambda text: text.replace("message ListRequest {}\n", ""), "ListRequest"),
    ],
)
def test_the_guard_refuses_breaking_changes(tmp_path, change, edit, expected):
    result = breaking(module_copy(tmp_path, edit))
    assert result.returncode != 0, f"buf breaking accepted a {change}:\n{result.stdout}{result.stderr}"
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr


def _normalized(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The schema alone: no file name (buf's is module-relative), comments or buf's json names."""
    file = descriptor_pb2.FileDescriptorProto.FromString(file.SerializeToString())
    file.DiscardUnknownFields()  # buf's ImageFile extras
    file.ClearField("name")
    file.ClearField("source_code_info")

    def strip(messages):
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)

    strip(file.message_type)
    return file


def _message_names(messages, prefix: str) -> set[str]:
    names = set()
    for message in messages:
        names.add(prefix + message.name)
        names |= _message_names(message.nested_type, f"{prefix}{message.name}.")
    return names


def test_the_image_is_the_generated_code_schema():
    assert IMAGE.exists(), "fleet/proto/flotilla_v1.binpb is missing: run scripts/freeze_proto.sh"
    # A buf image is wire-compatible with a FileDescriptorSet (its extra ImageFile fields are unknown here).
    image = descriptor_pb2.FileDescriptorSet.FromString(IMAGE.read_bytes())
    assert [file.name for file in image.file] == [str(PROTO_IN_MODULE)]
    frozen = image.file[0]
    generated = descriptor_pb2.FileDescriptorProto()
    flotilla_pb2.DESCRIPTOR.CopyToProto(generated)

    assert frozen.package == generated.package == flotilla_pb2.DESCRIPTOR.package == "flotilla.v1"
    frozen_messages = _message_names(frozen.message_type, "flotilla.v1.")
    missing = sorted(name for name in frozen_messages if not _in_generated(name))
    assert not missing, f"messages of the frozen image missing from the generated code: {missing}"
    new = sorted(_message_names(generated.message_type, "flotilla.v1.") - frozen_messages)
    assert not new, (
        f"messages not in the frozen image: {new}: run scripts/freeze_proto.sh and commit the image"
    )
    assert {s.name for s in frozen.service} == set(flotilla_pb2.DESCRIPTOR.services_by_name)
    assert {e.name for e in frozen.enum_type} == set(flotilla_pb2.DESCRIPTOR.enum_types_by_name)
    frozen_text, generated_text = str(_normalized(frozen)), str(_normalized(generated))
    difference = "\n".join(
        difflib.unified_diff(
            frozen_text.splitlines(), generated_text.splitlines(), "image", "generated", lineterm=""
        )
    )
    assert frozen_text == generated_text, (
        "the frozen image and the generated code describe different schemas: after an allowed .proto change "
        f"regenerate the code (see fleet/proto/__init__.py) and run scripts/freeze_proto.sh\n{difference}"
    )


def _in_generated(full_name: str) -> bool:
    try:
        return flotilla_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name).file is flotilla_pb2.DESCRIPTOR
    except KeyError:
        return False


def test_every_allocator_reason_has_its_own_wire_value():
    """Each reason the allocator gives travels as its own enum value and comes back by name (an unmapped
    one would reach operators as UNSPECIFIED)."""
    from fleet import allocation, wire

    releases = [allocation.PREEMPTED, allocation.RESET_DONE, allocation.NO_LONGER_NEEDED, "operator_release"]
    for reason in releases:
        value = wire.release_reason_to_wire(reason)
        assert value != flotilla_pb2.RELEASE_REASON_UNSPECIFIED, reason
        assert wire.release_reason_name(value) == reason
    assert len({wire.release_reason_to_wire(reason) for reason in releases}) == len(releases)
