"""Blocking helpers for the registry and admin services: publish, fetch (verified), list, status."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from fleet.client._session import _credentials, _metadata
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.registry_rules import check_filename, check_version  # the registry's own file rules

log = logging.getLogger(__name__)


def _channel(target: str, root_certificates=None) -> grpc.Channel:
    credentials = _credentials(root_certificates)
    return grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)


class CheckpointError(RuntimeError):
    """A fetched checkpoint failed its checks (a file's sha256 or size, a missing sha256): nothing was kept."""


def _file_chunks(path: Path, version: str, chunk_bytes: int) -> Iterator[pb.CheckpointChunk]:
    """One file's chunks; the last carries the file's SHA-256 (computed while reading)."""

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        offset, data = 0, file.read(chunk_bytes)
        while True:
            following = file.read(chunk_bytes) if data else b""
            digest.update(data)
            last = not following
            yield pb.CheckpointChunk(
                version=version,
                filename=path.name,
                data=data,
                offset=offset,
                last=last,
                sha256=digest.hexdigest() if last else "",
            )
            if last:
                break
            offset, data = offset + len(data), following


def publish_checkpoint(
    target: str,
    token: str,
    folder: str | os.PathLike,
    version: str,
    chunk_bytes: int = 1024 * 1024,
    root_certificates=None,
) -> pb.PublishResult:
    """Upload a checkpoint folder (its .json/.yaml/.safetensors files) as `version` (trainer token).

    Each file's last chunk carries its SHA-256: the server refuses the publish (INVALID_ARGUMENT) when
    what it received hashes differently.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    if not files:
        raise ValueError(f"{folder}: no files to publish")

    def chunks():
        for path in files:
            yield from _file_chunks(path, version, chunk_bytes)

    with _channel(target, root_certificates) as channel:
        return pb_grpc.RegistryServiceStub(channel).Publish(chunks(), metadata=_metadata(token))


class _FetchedFile:
    def __init__(self, path: Path):

        self.name, self.file, self.digest, self.size = path.name, open(path, "wb"), hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)


def fetch_checkpoint(
    target: str, token: str, dest: str | os.PathLike, version: str = "", root_certificates=None
) -> Path:
    """Download `version` (default: the latest) into `dest/<version>/`; returns that folder.

    File names are checked here too (plain names, allowed suffixes); every file must arrive whole, in
    order, with the SHA-256 the server sent on its last chunk (else CheckpointError; a server's refusal,
    e.g. DATA_LOSS for a damaged version, is a grpc.RpcError). The folder appears complete or not at all.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / f".partial-{os.getpid()}-{time.monotonic_ns()}"
    partial.mkdir()
    got, done, current = "", set(), None

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(
            f"fetch of policy version {got or version or '(latest)'!r} from {target}: {problem}; "
            "nothing was kept"
        )

    try:
        with _channel(target, root_certificates) as channel:
            for chunk in pb_grpc.RegistryServiceStub(channel).Fetch(
                pb.FetchRequest(version=version), metadata=_metadata(token)
            ):
                got = check_version(chunk.version or got)
                name = check_filename(chunk.filename)
                if current is None or current.name != name:
                    if current is not None:
                        raise fail(f"file {current.name!r} ended without its last chunk")
                    if name in done:
                        raise fail(f"file {name!r} was sent twice")
                    current = _FetchedFile(partial / name)
                if chunk.offset != current.size:
                    raise fail(f"file {name!r}: chunk at offset {chunk.offset}, expected {current.size}")
                current.write(chunk.data)
                if chunk.last:
                    current.file.close()
                    if not chunk.sha256:
                        raise fail(
                            f"the server sent no sha256 for file {name!r} (a server older than protocol v1?)"
                        )
                    received = current.digest.hexdigest()
                    if chunk.sha256.lower() != received:
                        raise fail(
                            f"file {name!r} does not match its sha256: {current.size} bytes received hash to "
                            f"{received}, the server sent {chunk.sha256}"
                        )
                    done.add(name)
                    current = None
        if current is not None:
            raise fail(f"file {current.name!r} ended without its last chunk")
        if not done:
            raise fail("the server sent no files")
        final = dest / got
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        return final
    except BaseException:
        if current is not None:
            current.file.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise


def list_policies(target: str, token: str, root_certificates=None) -> pb.PolicyVersions:
    with _channel(target, root_certificates) as channel:
        return pb_grpc.RegistryServiceStub(channel).List(pb.ListRequest(), metadata=_metadata(token))


def fleet_status(target: str, token: str, root_certificates=None) -> pb.FleetStatus:
    """AdminService.Status (admin token)."""
    with _channel(target, root_certificates) as channel:
        return pb_grpc.AdminServiceStub(channel).Status(pb.StatusRequest(), metadata=_metadata(token))
