"""The policy registry: checkpoint folders by version on disk, published and fetched in chunks.

Layout of the registry folder:

    <version>/<files>          a checkpoint: plain .json/.yaml/.yml/.safetensors files, immutable
    <version>/.manifest.json   {"format": 1, "files": {name: {"bytes": n, "sha256": hex}}}
    LATEST                     the version last published (one line)
    .incoming-<id>/            a publish in progress (a leftover of a crash is removed at start)

A publish is written into a hidden folder and renamed into place, so a version is either complete or
absent. Only plain file names ending in .json/.yaml/.yml/.safetensors are accepted (checkpoints hold
data, never code); anything else, path separators and names starting with '.' included, is refused, so
an upload never clashes with the manifest. Version names are letters, digits and . _ + - (not starting
with . or -); `LATEST` is reserved in any case (`latest`, `Latest`: the pointer file's name, also on
case-insensitive file systems).

Integrity: the server hashes (SHA-256) every file while receiving it and refuses a publish whose
client-sent sha256 (on a file's last chunk) differs; the manifest keeps each file's size and hash.
Fetch hashes each file again while sending it and puts the manifest's sha256 on the file's last chunk;
a file that differs from its manifest (or vanishes, or changes size mid-fetch) ends the Fetch with
DATA_LOSS naming the file before its last chunk goes out, and the version is damaged from then on.

Damage is never fatal: at start the registry scans its folder (hashing every file: about a second per
GB) and skips what it cannot serve, with a warning, and lists it in `damaged()` ("name: why",
PolicyVersions.damaged): a version folder with no files, unreadable or stray files, a file differing
from its manifest, a bad manifest, stray entries in the registry folder, a LATEST that is a folder,
unreadable, or names a missing or damaged version. The good versions are served. When LATEST is
damaged, `latest()` is "" (there is no latest version: Fetch without a version is NOT_FOUND naming the
reason) rather than a guess that could roll robots back to an older policy; the next publish writes a
new LATEST. A LATEST folder (a version named LATEST published by older code) is moved aside to
`.moved-LATEST-<id>` by that publish, and stays listed as damaged until someone renames or deletes it.
Versions published by older code have no manifest: the scan computes one and writes it (or, when the
folder is read-only, keeps it in memory).

The scan happens once, at start: versions added to the folder by hand are seen after a restart. File
I/O runs in worker threads, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.registry_rules import (  # noqa: F401 - re-exported: the registry's rules live beside the client SDK
    ALLOWED_SUFFIXES,
    LATEST_FILE,
    RESERVED_VERSIONS,
    SHA256_PATTERN,
    RegistryError,
    check_filename,
    check_sha256,
    check_version,
)
from fleet.server.config import ServerConfig
from fleet.server.streams import CallLimits, FleetError, check_decoded, write_replies

log = logging.getLogger(__name__)

MANIFEST_FILE = ".manifest.json"
MANIFEST_FORMAT = 1
_INCOMING = ".incoming-"  # a publish in progress
_LATEST_TEMP = f".{LATEST_FILE}."  # LATEST being replaced
_MANIFEST_TEMP = f"{MANIFEST_FILE}."  # a manifest being written
_MOVED_LATEST = f".moved-{LATEST_FILE}-"  # a LATEST folder moved aside by a publish
_READ_BYTES = 1024 * 1024


class _Damaged(Exception):
    """A registry entry that cannot be served (the message says why)."""


@dataclass(frozen=True)
class FileEntry:
    """One checkpoint file in a version's manifest."""

    size: int
    sha256: str


Manifest = dict[str, FileEntry]


def file_sha256(path: str | os.PathLike) -> FileEntry:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while data := file.read(_READ_BYTES):
            digest.update(data)
            size += len(data)
    return FileEntry(size, digest.hexdigest())


def manifest_json(manifest: Manifest) -> str:
    files = {name: {"bytes": entry.size, "sha256": entry.sha256} for name, entry in sorted(manifest.items())}
    return json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n"


def parse_manifest(text: str) -> Manifest:
    """A manifest's JSON; raises ValueError saying what is wrong."""
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not a format-{MANIFEST_FORMAT} manifest")
    files = document.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError("it lists no files")
    manifest = {}
    for name, entry in files.items():
        try:
            check_filename(name)
        except RegistryError as err:
            raise ValueError(str(err)) from None
        size = entry.get("bytes") if isinstance(entry, dict) else None
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        if (
            type(size) is not int
            or size < 0
            or not isinstance(sha256, str)
            or not SHA256_PATTERN.fullmatch(sha256)
        ):
            raise ValueError(f"bad entry for {name!r}: {entry!r}")
        manifest[name] = FileEntry(size, sha256)
    return manifest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write `path` through a temporary file in its folder, then rename it into place (atomic)."""
    prefix = _MANIFEST_TEMP if path.name == MANIFEST_FILE else f".{path.name}."
    temp = path.with_name(f"{prefix}{uuid.uuid4().hex}")
    try:
        with open(temp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _why(err: OSError) -> str:
    return err.strerror or str(err)


def _remove_leftover(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as err:  # a read-only registry still starts
        log.warning("registry: cannot remove the leftover %s (%s)", path, _why(err))


class PolicyRegistry:
    """The registry folder's versions (see the module docstring). Safe to call from several threads.

    `verify_on_start`: hash every file at start (default); False checks only sizes at start and leaves
    the hashes to Fetch (for registries too large to hash at every start).
    """

    def __init__(self, root: str | os.PathLike, max_checkpoint_bytes: int, verify_on_start: bool = True):
        self.root = Path(root)
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._versions: dict[str, Manifest] = {}
        self._damaged: dict[str, str] = {}
        self._latest = ""
        self._scan(verify_on_start)

    # ----------------------------------------------------------------------------------------- state

    def versions(self) -> list[str]:
        """The versions that can be served."""
        with self._lock:
            return sorted(self._versions)

    def latest(self) -> str:
        """The version last published, or "" when there is none or LATEST is damaged (see damaged())."""
        with self._lock:
            return self._latest

    def damaged(self) -> list[str]:
        """The registry entries that cannot be served, as "name: why"."""
        with self._lock:
            return [f"{name}: {why}" for name, why in sorted(self._damaged.items())]

    def no_latest_reason(self) -> str:
        with self._lock:
            if LATEST_FILE in self._damaged:
                return (
                    f"there is no latest policy version: {LATEST_FILE} {self._damaged[LATEST_FILE]}; "
                    "fetch a version by name"
                )
        return "the registry is empty: nothing is published yet"

    def manifest(self, version: str) -> Manifest:
        """The version's files (name -> size and sha256); DATA_LOSS when it is damaged."""
        check_version(version)
        with self._lock:
            if version in self._versions:
                return dict(self._versions[version])
            if version in self._damaged:
                raise RegistryError(
                    grpc.StatusCode.DATA_LOSS,
                    f"policy version {version!r} is damaged: {self._damaged[version]}",
                )
            have = sorted(self._versions)
        raise RegistryError(
            grpc.StatusCode.NOT_FOUND, f"no policy version {version!r} in the registry (have: {have})"
        )

    def files(self, version: str) -> list[tuple[Path, int]]:
        """The version's files with their sizes."""
        folder = self.root / version
        return [(folder / name, entry.size) for name, entry in sorted(self.manifest(version).items())]

    def mark_damaged(self, version: str, why: str) -> None:
        """Stop serving `version` (a file of it no longer matches its manifest)."""
        with self._lock:
            if self._versions.pop(version, None) is None:
                return
            self._damaged[version] = why
            if self._latest == version:
                self._latest = ""
                self._damaged[LATEST_FILE] = f"names version {version!r}, which is damaged"
        log.error(
            "registry %s: policy version %s is damaged and no longer served: %s", self.root, version, why
        )

    # --------------------------------------------------------------------------------------- publish

    def begin(self, version: str) -> Path:
        check_version(version)
        with self._lock:
            taken = version in self._versions or version in self._damaged
        if taken or os.path.lexists(self.root / version):
            raise RegistryError(
                grpc.StatusCode.ALREADY_EXISTS, f"policy version {version!r} is already published"
            )
        incoming = self.root / f"{_INCOMING}{uuid.uuid4().hex}"
        incoming.mkdir()
        return incoming

    def finish(self, incoming: Path, version: str, manifest: Manifest | None = None) -> None:
        """Write the manifest, move a complete upload into place (atomic), then point LATEST at it.

        The files must be durable already; without `manifest` it is computed from them.
        """
        if manifest is None:
            manifest = {path.name: file_sha256(path) for path in incoming.iterdir()}
        _write_durably(incoming / MANIFEST_FILE, manifest_json(manifest))
        with self._lock:
            try:
                os.rename(incoming, self.root / version)
            except OSError:
                raise RegistryError(
                    grpc.StatusCode.ALREADY_EXISTS, f"policy version {version!r} is already published"
                ) from None
            self._versions[version] = dict(manifest)
            try:
                self._point_latest_at(version)
            except OSError as err:
                raise RegistryError(
                    grpc.StatusCode.INTERNAL,
                    f"policy version {version!r} was published, but {LATEST_FILE} could not be updated: {_why(err)}",
                ) from err

    def _point_latest_at(self, version: str) -> None:
        latest = self.root / LATEST_FILE
        if latest.is_dir() and not latest.is_symlink():
            moved = f"{_MOVED_LATEST}{uuid.uuid4().hex[:12]}"
            os.rename(latest, self.root / moved)
            self._damaged[moved] = self._moved_latest_why()
            log.warning(
                "registry %s: moved the folder %s aside to %s to write the %s pointer (%s)",
                self.root,
                LATEST_FILE,
                moved,
                LATEST_FILE,
                self._damaged[moved],
            )
        _write_durably(latest, version + "\n")
        self._latest = version
        self._damaged.pop(LATEST_FILE, None)

    @staticmethod
    def _moved_latest_why() -> str:
        return (
            f"a folder named {LATEST_FILE} (a checkpoint published as version {LATEST_FILE!r} by older code), "
            f"moved aside when a version was published: rename it to a valid version and restart to serve it, "
            f"or delete it"
        )

    # ------------------------------------------------------------------------------------------ scan

    def _scan(self, verify: bool) -> None:
        """Load every version at start; damage is logged and listed, never raised."""
        latest_entry = None
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            name = entry.name
            if name.startswith(_INCOMING):  # a publish cut short by a crash
                shutil.rmtree(entry.path, ignore_errors=True)
            elif name.startswith(_LATEST_TEMP) and entry.is_file(follow_symlinks=False):
                _remove_leftover(entry.path)  # a LATEST update cut short by a crash
            elif name == LATEST_FILE:
                latest_entry = entry
            elif name.startswith(_MOVED_LATEST):
                self._damaged[name] = self._moved_latest_why()
            elif entry.is_symlink() or not entry.is_dir():
                kind = "a link" if entry.is_symlink() else "a stray file"
                self._damaged[name] = (
                    f"{kind} in the registry folder (it holds version folders and {LATEST_FILE})"
                )
            else:
                try:
                    check_version(name)
                except RegistryError as err:
                    self._damaged[name] = f"not a version folder: {err}"
                    continue
                try:
                    self._versions[name] = self._load_version(Path(entry.path), verify)
                except _Damaged as err:
                    self._damaged[name] = str(err)
        self._latest = self._read_latest(latest_entry)
        for name, why in sorted(self._damaged.items()):
            log.warning("registry %s: skipping damaged entry %s: %s", self.root, name, why)
        log.info(
            "registry %s: %d policy versions (latest %r), %d damaged entries",
            self.root,
            len(self._versions),
            self._latest,
            len(self._damaged),
        )

    def _read_latest(self, entry: os.DirEntry | None) -> str:
        if entry is None:
            return ""
        if entry.is_symlink() or not entry.is_file():
            kind = "a link" if entry.is_symlink() else "a folder" if entry.is_dir() else "not a file"
            why = f"is {kind}, not the file naming the latest version"
            if kind == "a folder":
                why += f" (a checkpoint published as version {LATEST_FILE!r} by older code?)"
            self._damaged[LATEST_FILE] = why + "; the next publish replaces it"
            return ""
        try:
            with open(entry.path, "rb") as file:
                version = file.read(1024).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            why = _why(err) if isinstance(err, OSError) else "not text"
            self._damaged[LATEST_FILE] = f"is unreadable ({why}); the next publish replaces it"
            return ""
        if version in self._versions:
            return version
        if not version:
            why = "is empty"
        elif version in self._damaged:
            why = f"names version {version!r}, which is damaged"
        else:
            why = f"names version {version!r}, which is not in the registry"
        self._damaged[LATEST_FILE] = why + "; the next publish replaces it"
        return ""

    def _load_version(self, folder: Path, verify: bool) -> Manifest:
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise _Damaged(f"unreadable folder ({_why(err)})") from None
        files, strays, has_manifest = [], [], False
        for entry in entries:
            if entry.name == MANIFEST_FILE:
                has_manifest = True
            elif entry.name.startswith(_MANIFEST_TEMP) and entry.is_file(follow_symlinks=False):
                _remove_leftover(entry.path)  # a manifest write cut short by a crash
            elif entry.is_file(follow_symlinks=False) and _is_checkpoint_name(entry.name):
                files.append(entry.name)
            else:
                strays.append(entry.name)
        if strays:
            raise _Damaged(
                f"stray entries {sorted(strays)} (a version holds only plain "
                f"{'/'.join(ALLOWED_SUFFIXES)} files and its {MANIFEST_FILE})"
            )
        if not has_manifest:
            return self._add_manifest(folder, sorted(files))
        try:
            manifest = parse_manifest((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            why = _why(err) if isinstance(err, OSError) else str(err)
            raise _Damaged(f"bad {MANIFEST_FILE} ({why})") from None
        if missing := sorted(set(manifest) - set(files)):
            raise _Damaged(f"files {missing} of its manifest are missing")
        if extra := sorted(set(files) - set(manifest)):
            raise _Damaged(f"files {extra} are not in its manifest")
        for name, expected in sorted(manifest.items()):
            try:
                found = (
                    file_sha256(folder / name) if verify else FileEntry(os.stat(folder / name).st_size, "")
                )
            except OSError as err:
                raise _Damaged(f"file {name!r} is unreadable ({_why(err)})") from None
            if found.size != expected.size:
                raise _Damaged(f"file {name!r} has {found.size} bytes, its manifest says {expected.size}")
            if verify and found.sha256 != expected.sha256:
                raise _Damaged(f"file {name!r} does not match the sha256 in its manifest")
        return manifest

    def _add_manifest(self, folder: Path, files: list[str]) -> Manifest:
        """A version published before manifests existed: hash its files and write its manifest."""
        if not files:
            raise _Damaged("no checkpoint files")
        manifest = {}
        for name in files:
            try:
                manifest[name] = file_sha256(folder / name)
            except OSError as err:
                raise _Damaged(f"file {name!r} is unreadable ({_why(err)})") from None
        try:
            _write_durably(folder / MANIFEST_FILE, manifest_json(manifest))
        except OSError as err:
            log.warning(
                "registry %s: version %s has no %s and none could be written (%s): serving it with the "
                "hashes of its files now",
                self.root,
                folder.name,
                MANIFEST_FILE,
                _why(err),
            )
        else:
            log.info(
                "registry %s: wrote %s for version %s (published by older code)",
                self.root,
                MANIFEST_FILE,
                folder.name,
            )
        return manifest


def _is_checkpoint_name(name: str) -> bool:
    try:
        check_filename(name)
    except RegistryError:
        return False
    return True


class _Upload:
    """One Publish in progress: files arrive as consecutive chunks, each file exactly once."""

    def __init__(self, registry: PolicyRegistry, version: str):
        self.registry, self.version = registry, version
        self.folder = registry.begin(version)
        self.manifest: Manifest = {}
        self.current = None  # the file being received: (name, open file, sha256 so far)
        self.size = 0
        self.total = 0

    def write(self, chunk: pb.CheckpointChunk) -> None:
        if chunk.version and chunk.version != self.version:
            raise RegistryError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk for version {chunk.version!r} inside a publish of {self.version!r}",
            )
        name = check_filename(chunk.filename)
        if self.current is None or self.current[0] != name:
            if self.current is not None:
                raise RegistryError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"file {self.current[0]!r} ended without a chunk marked last",
                )
            if name in self.manifest:
                raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, f"file {name!r} was sent twice")
            self.current, self.size = (name, open(self.folder / name, "wb"), hashlib.sha256()), 0
        if chunk.offset != self.size:
            raise RegistryError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"file {name!r}: chunk at offset {chunk.offset}, expected {self.size}",
            )
        if chunk.sha256 and not chunk.last:
            raise RegistryError(
                grpc.StatusCode.INVALID_ARGUMENT, f"file {name!r}: sha256 goes on the file's last chunk only"
            )
        self.total += len(chunk.data)
        if self.total > self.registry.max_checkpoint_bytes:
            raise RegistryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"checkpoint is over max_checkpoint_bytes={self.registry.max_checkpoint_bytes}",
            )
        _, file, digest = self.current
        file.write(chunk.data)
        digest.update(chunk.data)
        self.size += len(chunk.data)
        if chunk.last:
            received = digest.hexdigest()
            if chunk.sha256 and check_sha256(chunk.sha256, f"file {name!r}") != received:
                raise RegistryError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"file {name!r}: the data received hashes to sha256 {received}, the client sent "
                    f"{chunk.sha256.lower()}: refused (nothing of this publish is kept)",
                )
            file.flush()
            os.fsync(file.fileno())  # durable before it becomes visible
            file.close()
            self.manifest[name] = FileEntry(self.size, received)
            self.current = None

    def finish(self) -> None:
        if self.current is not None:
            raise RegistryError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"file {self.current[0]!r} ended without a chunk marked last",
            )
        if not self.manifest:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, "a checkpoint needs at least one file")
        self.registry.finish(self.folder, self.version, self.manifest)

    def discard(self) -> None:
        if self.current is not None:
            self.current[1].close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _FileReader:
    """Reads one file of a version for Fetch, checking it against the manifest as it goes: a file that
    vanished, changed size or does not hash to its manifest's sha256 damages the version (DATA_LOSS),
    and is noticed before the caller sends the file's last chunk."""

    def __init__(self, registry: PolicyRegistry, version: str, name: str, entry: FileEntry):
        self.registry, self.version, self.name, self.entry = registry, version, name, entry
        self.offset = 0
        self.digest = hashlib.sha256()
        self.file = None
        try:
            fd = os.open(registry.root / version / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            self._damaged("is missing")
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EACCES, errno.EPERM, errno.EISDIR):
                self._damaged(f"cannot be opened ({_why(err)})")
            raise self._unavailable(err) from None
        self.file = os.fdopen(fd, "rb")
        size = os.fstat(fd).st_size
        if size != entry.size:
            self.close()
            self._damaged(f"has {size} bytes, its manifest says {entry.size}")

    def read(self, n: int) -> bytes:
        """The next chunk (at most n bytes); once it returns the file's end, the file was checked whole."""
        want = min(n, self.entry.size - self.offset)
        try:
            data = self.file.read(want)
            if len(data) < want:
                self._damaged("shrank while being fetched")
            self.digest.update(data)
            self.offset += len(data)
            if self.offset == self.entry.size:
                if self.file.read(1):
                    self._damaged("grew while being fetched")
                if self.digest.hexdigest() != self.entry.sha256:
                    self._damaged("does not match the sha256 in its manifest")
        except OSError as err:
            raise self._unavailable(err) from None
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _damaged(self, why: str):
        why = f"file {self.name!r} {why}"
        self.registry.mark_damaged(self.version, why)
        raise RegistryError(grpc.StatusCode.DATA_LOSS, f"policy version {self.version!r} is damaged: {why}")

    def _unavailable(self, err: OSError) -> RegistryError:
        return RegistryError(
            grpc.StatusCode.UNAVAILABLE,
            f"cannot read file {self.name!r} of policy version {self.version!r} right now ({_why(err)})",
        )


class KeyedTurns:
    """At most `per_key` holders of a turn per key at once (the rest wait); a key's semaphore exists only
    while someone holds or waits for it, so callers that come and go leave nothing behind."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self._turns: dict[tuple, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: tuple):
        semaphore, users = self._turns.get(key, (None, 0))
        semaphore = semaphore or asyncio.Semaphore(self.per_key)
        self._turns[key] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._turns[key]
            if users == 1:
                del self._turns[key]
            else:
                self._turns[key] = (semaphore, users - 1)


class RegistryService(pb_grpc.RegistryServiceServicer):
    def __init__(
        self,
        registry: PolicyRegistry,
        chunk_bytes: int,
        on_new_latest: Callable[[str], None],
        max_fetches: int = ServerConfig.max_concurrent_fetches,
        stalled_reader_s: float = ServerConfig.stalled_reader_s,
        *,
        auth=None,  # a TokenAuth: names the caller's token for the per-token limits (None: one caller)
        limits: CallLimits | None = None,
        fetch_turns_per_caller: int = ServerConfig.max_fetches_per_caller,
    ):
        self.registry = registry
        self.chunk_bytes = chunk_bytes
        self.on_new_latest = on_new_latest
        # A Fetch in flight holds megabytes (its chunk in gRPC's buffers) for as long as its reader lets it:
        # 400 fetches that never read took flotilla serve to 1.7 GB. So at most max_fetches send at once
        # (the others wait their turn), and one whose reader stalls is ended (write_replies); it keeps its
        # turn until its stream is gone (its last chunk is still held), so memory stays bounded.
        self._sending = asyncio.Semaphore(max_fetches)
        # ... and at most fetch_turns_per_caller of those turns go to one token or one address, so a
        # caller's deaf fetches (each holds its turn until its stream is gone) cannot take them all.
        self._caller_turns = KeyedTurns(fetch_turns_per_caller)
        self.stalled_reader_s = stalled_reader_s
        self.auth = auth
        self.limits = limits or CallLimits(ServerConfig.max_calls_per_token, ServerConfig.max_calls_per_peer)

    async def Publish(self, requests, context):  # noqa: N802 - the generated servicer's name
        upload = None
        try:
            async for chunk in requests:
                check_decoded(chunk, "Publish", context)
                if upload is None:
                    if not chunk.version:
                        raise RegistryError(
                            grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must carry the version"
                        )
                    upload = await asyncio.to_thread(_Upload, self.registry, chunk.version)
                await asyncio.to_thread(upload.write, chunk)
            if upload is None:
                raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, "empty publish: no chunks were sent")
            await asyncio.to_thread(upload.finish)
        except (RegistryError, FleetError) as err:
            if upload is not None:
                await asyncio.to_thread(upload.discard)
            await context.abort(err.code, str(err))
        except (
            OSError
        ) as err:  # the registry's disk (full, read-only): the publisher is told, nothing is kept
            if upload is not None:
                await asyncio.to_thread(upload.discard)
            log.error("publish failed: %s", err)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"the registry cannot store the checkpoint: {err.strerror}"
            )
        except BaseException:
            if upload is not None:
                await asyncio.to_thread(upload.discard)
            raise
        log.info("published policy version %s (%d bytes)", upload.version, upload.total)
        self.on_new_latest(upload.version)
        return pb.PublishResult(version=upload.version, bytes=upload.total)

    async def Fetch(self, request, context) -> None:  # noqa: N802
        identity = None if self.auth is None else self.auth.identity_of(context.invocation_metadata())
        try:
            with self.limits.call(identity, context, "Fetch"):
                keys = CallLimits.keys(identity, context)
                async with (
                    self._caller_turns.turn(keys["token"]),
                    self._caller_turns.turn(keys["peer"]),
                    self._sending,
                ):
                    await write_replies(self._chunks(request, context), context, self.stalled_reader_s)
        except FleetError as err:
            await context.abort(err.code, err.message)

    async def _chunks(self, request, context):
        try:
            version = request.version or self.registry.latest()
            if not version:
                raise RegistryError(grpc.StatusCode.NOT_FOUND, self.registry.no_latest_reason())
            manifest = self.registry.manifest(version)
        except RegistryError as err:
            await context.abort(err.code, str(err))
        for name, entry in sorted(manifest.items()):
            try:
                reader = await asyncio.to_thread(_FileReader, self.registry, version, name, entry)
            except RegistryError as err:
                await context.abort(err.code, str(err))
            try:
                while True:
                    offset = reader.offset
                    try:
                        data = await asyncio.to_thread(reader.read, self.chunk_bytes)
                    except RegistryError as err:
                        await context.abort(err.code, str(err))
                    last = reader.offset == entry.size
                    yield pb.CheckpointChunk(
                        version=version,
                        filename=name,
                        data=data,
                        offset=offset,
                        last=last,
                        sha256=entry.sha256 if last else "",
                    )
                    if last:
                        break
            finally:
                reader.close()

    async def List(self, request, context):  # noqa: N802
        return pb.PolicyVersions(
            versions=self.registry.versions(), latest=self.registry.latest(), damaged=self.registry.damaged()
        )
