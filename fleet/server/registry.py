"""The policy registry: checkpoint folders by version on disk, published and fetched in chunks.

Layout: `<registry_dir>/<version>/<files>` plus `<registry_dir>/LATEST` (the version last published).
A publish is written into a hidden folder and renamed into place, so a version is either complete or
absent, and versions are immutable. Only plain file names ending in .json/.yaml/.yml/.safetensors are
accepted (checkpoints hold data, never code); anything else, path separators included, is refused.
File I/O runs in worker threads, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc

from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ALLOWED_SUFFIXES = (".json", ".yaml", ".yml", ".safetensors")
LATEST_FILE = "LATEST"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class RegistryError(ValueError):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def check_version(version: str) -> str:
    if not _VERSION.fullmatch(version or ""):
        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"bad version {version!r}: use letters, digits and . _ + - (not starting with . or -)")
    return version


def check_filename(name: str) -> str:
    """A checkpoint file name: no directories, no traversal, an allowed suffix."""
    if not name or name != os.path.basename(name) or "\\" in name or name.startswith(".") or "\0" in name:
        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"bad checkpoint file name {name!r}: plain names only, no folders or '..'")
    if not name.endswith(ALLOWED_SUFFIXES):
        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"checkpoint file {name!r} is not allowed: only {', '.join(ALLOWED_SUFFIXES)} files")
    return name


class PolicyRegistry:
    def __init__(self, root: str | os.PathLike, max_checkpoint_bytes: int):
        self.root = Path(root)
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".incoming-*"):  # publishes cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name))

    def latest(self) -> str:
        path = self.root / LATEST_FILE
        return path.read_text().strip() if path.exists() else ""

    def files(self, version: str) -> list[tuple[Path, int]]:
        """The version's files with their sizes."""
        folder = self.root / check_version(version)
        if not folder.is_dir():
            raise RegistryError(grpc.StatusCode.NOT_FOUND,
                                f"no policy version {version!r} in the registry (have: {self.versions()})")
        return sorted((p, p.stat().st_size) for p in folder.iterdir()
                      if p.is_file() and p.name.endswith(ALLOWED_SUFFIXES))

    def begin(self, version: str) -> Path:
        check_version(version)
        if (self.root / version).exists():
            raise RegistryError(grpc.StatusCode.ALREADY_EXISTS, f"policy version {version!r} is already published")
        incoming = self.root / f".incoming-{uuid.uuid4().hex}"
        incoming.mkdir()
        return incoming

    def finish(self, incoming: Path, version: str) -> None:
        """Move a complete upload into place (atomic), then point LATEST at it."""
        try:
            os.rename(incoming, self.root / version)
        except OSError:
            raise RegistryError(grpc.StatusCode.ALREADY_EXISTS, f"policy version {version!r} is already published") from None
        temp = self.root / f".{LATEST_FILE}.{uuid.uuid4().hex}"
        temp.write_text(version + "\n")
        os.replace(temp, self.root / LATEST_FILE)


class _Upload:
    """One Publish in progress: files arrive as consecutive chunks, each file exactly once."""

    def __init__(self, registry: PolicyRegistry, version: str):
        self.registry, self.version = registry, version
        self.folder = registry.begin(version)
        self.done: set[str] = set()
        self.current: tuple[str, object] | None = None  # (name, open file)
        self.size = 0
        self.total = 0

    def write(self, chunk: pb.CheckpointChunk) -> None:
        if chunk.version and chunk.version != self.version:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"chunk for version {chunk.version!r} inside a publish of {self.version!r}")
        name = check_filename(chunk.filename)
        if self.current is None or self.current[0] != name:
            if self.current is not None:
                raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"file {self.current[0]!r} ended without a chunk marked last")
            if name in self.done:
                raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, f"file {name!r} was sent twice")
            self.current, self.size = (name, open(self.folder / name, "wb")), 0
        if chunk.offset != self.size:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"file {name!r}: chunk at offset {chunk.offset}, expected {self.size}")
        self.total += len(chunk.data)
        if self.total > self.registry.max_checkpoint_bytes:
            raise RegistryError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"checkpoint is over max_checkpoint_bytes={self.registry.max_checkpoint_bytes}")
        self.current[1].write(chunk.data)
        self.size += len(chunk.data)
        if chunk.last:
            self.current[1].close()
            self.done.add(name)
            self.current = None

    def finish(self) -> None:
        if self.current is not None:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"file {self.current[0]!r} ended without a chunk marked last")
        if not self.done:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, "a checkpoint needs at least one file")
        for name in self.done:  # durable before it becomes visible
            with open(self.folder / name, "rb+") as file:
                os.fsync(file.fileno())
        self.registry.finish(self.folder, self.version)

    def discard(self) -> None:
        if self.current is not None:
            self.current[1].close()
        shutil.rmtree(self.folder, ignore_errors=True)


class RegistryService(pb_grpc.RegistryServiceServicer):
    def __init__(self, registry: PolicyRegistry, chunk_bytes: int, on_new_latest: Callable[[str], None]):
        self.registry = registry
        self.chunk_bytes = chunk_bytes
        self.on_new_latest = on_new_latest

    async def Publish(self, requests, context):  # noqa: N802 - the generated servicer's name
        upload = None
        try:
            async for chunk in requests:
                if upload is None:
                    if not chunk.version:
                        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must carry the version")
                    upload = await asyncio.to_thread(_Upload, self.registry, chunk.version)
                await asyncio.to_thread(upload.write, chunk)
            if upload is None:
                raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, "empty publish: no chunks were sent")
            await asyncio.to_thread(upload.finish)
        except RegistryError as err:
            if upload is not None:
                await asyncio.to_thread(upload.discard)
            await context.abort(err.code, str(err))
        except BaseException:
            if upload is not None:
                await asyncio.to_thread(upload.discard)
            raise
        log.info("published policy version %s (%d bytes)", upload.version, upload.total)
        self.on_new_latest(upload.version)
        return pb.PublishResult(version=upload.version, bytes=upload.total)

    async def Fetch(self, request, context):  # noqa: N802
        version = request.version or self.registry.latest()
        try:
            if not version:
                raise RegistryError(grpc.StatusCode.NOT_FOUND, "the registry is empty: nothing is published yet")
            files = await asyncio.to_thread(self.registry.files, version)
        except RegistryError as err:
            await context.abort(err.code, str(err))
        for path, size in files:
            with open(path, "rb") as file:
                offset = 0
                while True:
                    data = await asyncio.to_thread(file.read, self.chunk_bytes)
                    last = offset + len(data) >= size or len(data) < self.chunk_bytes
                    yield pb.CheckpointChunk(version=version, filename=path.name, data=data, offset=offset, last=last)
                    offset += len(data)
                    if last:
                        break

    async def List(self, request, context):  # noqa: N802
        versions = await asyncio.to_thread(self.registry.versions)
        return pb.PolicyVersions(versions=versions, latest=self.registry.latest())
