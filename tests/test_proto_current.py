"""The committed generated code in fleet/proto must be what the .proto generates today."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.proto import GENERATED_FILES, PROTO_FILE

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    # protoc writes paths relative to the include root, so mirror the .proto's place in the repo.
    (tmp_path / PROTO_FILE).parent.mkdir(parents=True)
    shutil.copy(ROOT / PROTO_FILE, tmp_path / PROTO_FILE)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            PROTO_FILE,
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    out = (tmp_path / PROTO_FILE).parent
    stale = [
        name
        for name in GENERATED_FILES
        if (out / name).read_bytes() != (ROOT / PROTO_FILE).parent.joinpath(name).read_bytes()
    ]
    assert not stale, (
        f"{stale} are stale: regenerate with `python -m grpc_tools.protoc -I . --python_out=. "
        f"--grpc_python_out=. --pyi_out=. {PROTO_FILE}` from the repository root"
    )
