"""The policy registry (fleet/server/registry.py) and its client functions (fleet/client/): reserved
names, damaged entries skipped and reported at start, per-file SHA-256 on publish and fetch, manifests
for versions published by older code, and Fetch's refusals.

The registry service runs here on a bare grpc.aio server on 127.0.0.1 (no auth interceptor: the client
functions' tokens are ignored), in a thread with its own event loop.
"""

import asyncio
import hashlib
import json
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from fleet.client import CheckpointError, fetch_checkpoint, list_policies, publish_checkpoint
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server import registry as registry_module
from fleet.server.registry import MANIFEST_FILE, FileEntry, PolicyRegistry, RegistryError, RegistryService

TOKEN = "trainer-token"


class RegistryServer:
    """A RegistryService on 127.0.0.1:<free port> (or any servicer, for the client's checks)."""

    def __init__(self, root: Path | None, chunk_bytes: int = 64 * 1024, servicer=None, **registry_options):
        self.published: list[str] = []
        self.registry = PolicyRegistry(root, 10**8, **registry_options) if root is not None else None
        self.servicer = servicer or RegistryService(self.registry, chunk_bytes, self.published.append)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.address = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        pb_grpc.add_RegistryServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stub_call(self, method: str, request):
        with grpc.insecure_channel(self.address) as channel:
            result = getattr(pb_grpc.RegistryServiceStub(channel), method)(request)
            return list(result) if method == "Fetch" else result

    def refusal(self, method: str, request) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.stub_call(method, request)
        return err.value


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint(folder: Path, seed: int = 0, size: int = 200_000) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "model.safetensors").write_bytes(np.random.default_rng(seed).bytes(size))
    (folder / "empty.yaml").write_bytes(b"")
    return folder


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def published_registry(root: Path, tmp_path: Path, *versions: str) -> dict[str, Path]:
    """`versions` published through a server that is then stopped; returns their source folders."""
    folders = {}
    with RegistryServer(root) as server:
        for i, version in enumerate(versions):
            folders[version] = checkpoint(tmp_path / "src" / version, seed=i)
            publish_checkpoint(server.address, TOKEN, folders[version], version, chunk_bytes=50_000)
    return folders


def tamper(path: Path) -> None:
    """Same size, different bytes."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged_names(versions: pb.PolicyVersions) -> dict[str, str]:
    return dict(entry.split(": ", 1) for entry in versions.damaged)


def nothing_left(dest: Path) -> bool:
    return not dest.exists() or not any(dest.iterdir())


# ------------------------------------------------------------------------------------- publish, fetch


def test_publish_fetch_list_round_trip_with_manifest(tmp_path):
    root = tmp_path / "registry"
    with RegistryServer(root, chunk_bytes=30_000) as server:
        folder = checkpoint(tmp_path / "ckpt")
        result = publish_checkpoint(server.address, TOKEN, folder, "v1", chunk_bytes=70_000)
        assert (result.version, result.bytes) == ("v1", 200_000 + len('{"seed": 0}'))
        assert server.published == ["v1"]

        fetched = fetch_checkpoint(server.address, TOKEN, tmp_path / "fetched")
        assert fetched == tmp_path / "fetched" / "v1" and same_files(fetched, folder)
        assert [p.name for p in (tmp_path / "fetched").iterdir()] == ["v1"]  # no partial folder left

        listed = list_policies(server.address, TOKEN)
        assert (list(listed.versions), listed.latest, list(listed.damaged)) == (["v1"], "v1", [])

        manifest = json.loads((root / "v1" / MANIFEST_FILE).read_text())
        assert manifest == {
            "format": 1,
            "files": {
                p.name: {"bytes": p.stat().st_size, "sha256": sha256(p.read_bytes())}
                for p in folder.iterdir()
            },
        }
        assert sorted(p.name for p in root.iterdir()) == ["LATEST", "v1"]


def test_fetch_puts_each_files_sha256_on_its_last_chunk(tmp_path):
    with RegistryServer(tmp_path / "registry", chunk_bytes=30_000) as server:
        folder = checkpoint(tmp_path / "ckpt")
        publish_checkpoint(server.address, TOKEN, folder, "v1")
        chunks = server.stub_call("Fetch", pb.FetchRequest(version="v1"))
    by_file: dict[str, list] = {}
    for chunk in chunks:
        by_file.setdefault(chunk.filename, []).append(chunk)
    assert sorted(by_file) == sorted(p.name for p in folder.iterdir())
    for name, file_chunks in by_file.items():
        assert [c.last for c in file_chunks] == [False] * (len(file_chunks) - 1) + [True]
        assert [c.sha256 for c in file_chunks[:-1]] == [""] * (len(file_chunks) - 1)
        assert file_chunks[-1].sha256 == sha256((folder / name).read_bytes())
    assert len(by_file["model.safetensors"]) == 7  # 200 000 bytes in 30 000-byte chunks


def test_publish_with_a_wrong_sha256_is_refused_and_nothing_is_kept(tmp_path):
    root = tmp_path / "registry"
    with RegistryServer(root) as server:

        def publish(*chunks) -> grpc.RpcError:
            return server.refusal("Publish", iter(chunks))

        good = pb.CheckpointChunk(
            version="v1", filename="config.json", data=b"{}", last=True, sha256=sha256(b"{}")
        )
        error = publish(
            good,
            pb.CheckpointChunk(filename="model.safetensors", data=b"abc", last=False),
            pb.CheckpointChunk(
                filename="model.safetensors", data=b"def", offset=3, last=True, sha256=sha256(b"abc")
            ),
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'model.safetensors'" in error.details() and sha256(b"abcdef") in error.details()
        assert sorted(os.listdir(root)) == []  # no version, no LATEST, no leftover upload

        error = publish(
            pb.CheckpointChunk(version="v1", filename="a.json", data=b"{}", last=True, sha256="xyz")
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad sha256" in error.details()
        error = publish(
            pb.CheckpointChunk(version="v1", filename="a.json", data=b"{", sha256=sha256(b"{}")),
            pb.CheckpointChunk(filename="a.json", data=b"}", offset=1, last=True),
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "last chunk only" in error.details()
        assert sorted(os.listdir(root)) == [] and server.published == []

        # The version is still free, and an upper-case hash or none at all is accepted.
        result = server.stub_call(
            "Publish",
            iter([pb.CheckpointChunk(version="v1", filename="config.json", data=b"{}", last=True,
                                     sha256=sha256(b"{}").upper()),
                  pb.CheckpointChunk(filename="x.yaml", data=b"a: 1", last=True)]),
        )  # fmt: skip
        assert result.version == "v1" and server.published == ["v1"]
        assert server.registry.manifest("v1")["x.yaml"] == FileEntry(4, sha256(b"a: 1"))


@pytest.mark.parametrize("version", ["LATEST", "latest", "Latest"])
def test_latest_is_a_reserved_version(tmp_path, version):
    root = tmp_path / "registry"
    with RegistryServer(root) as server:
        folder = checkpoint(tmp_path / "ckpt")
        with pytest.raises(grpc.RpcError) as err:
            publish_checkpoint(server.address, TOKEN, folder, version)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in err.value.details()
        assert os.listdir(root) == []
        error = server.refusal("Fetch", pb.FetchRequest(version=version))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in error.details()

        publish_checkpoint(server.address, TOKEN, folder, "v1")  # the registry still works
        listed = list_policies(server.address, TOKEN)
        assert (list(listed.versions), listed.latest, list(listed.damaged)) == (["v1"], "v1", [])
        assert (root / "LATEST").read_text() == "v1\n"


@pytest.mark.parametrize("version", ["../v1", "..", "v1/../v1", "/etc", ".hidden", "-v", "a b", "v1\\x"])
def test_fetch_and_publish_refuse_bad_versions_and_path_traversal(tmp_path, version):
    root = tmp_path / "registry"
    published_registry(root, tmp_path, "v1")
    (tmp_path / "outside.json").write_text("{}")
    with RegistryServer(root) as server:
        error = server.refusal("Fetch", pb.FetchRequest(version=version))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad version" in error.details()
        error = server.refusal(
            "Publish", iter([pb.CheckpointChunk(version=version, filename="a.json", last=True)])
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        for name in ("../outside.json", "../../etc/passwd", ".manifest.json", "a/b.json"):
            error = server.refusal(
                "Publish", iter([pb.CheckpointChunk(version="v2", filename=name, last=True)])
            )
            assert (
                error.code() == grpc.StatusCode.INVALID_ARGUMENT and "no folders or '..'" in error.details()
            )
        assert sorted(os.listdir(root)) == ["LATEST", "v1"]


def test_fetch_of_a_missing_version_and_of_an_empty_registry_is_not_found(tmp_path):
    with RegistryServer(tmp_path / "registry") as server:
        error = server.refusal("Fetch", pb.FetchRequest())
        assert error.code() == grpc.StatusCode.NOT_FOUND and "empty" in error.details()
        with pytest.raises(grpc.RpcError) as err:
            fetch_checkpoint(server.address, TOKEN, tmp_path / "dest", version="v9")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'v9'" in err.value.details()
        assert nothing_left(tmp_path / "dest")


# ------------------------------------------------------------------------------ damage at fetch time


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (tamper, "does not match the sha256"),
        (lambda path: path.write_bytes(path.read_bytes()[:-10]), "has 199990 bytes"),
        (lambda path: path.unlink(), "is missing"),
    ],
    ids=["tampered", "truncated", "deleted"],
)
def test_fetch_of_a_file_changed_after_publish_fails_clearly_and_keeps_nothing(tmp_path, change, expected):
    root = tmp_path / "registry"
    with RegistryServer(root, chunk_bytes=30_000) as server:
        folder = checkpoint(tmp_path / "ckpt")
        publish_checkpoint(server.address, TOKEN, folder, "v1")
        publish_checkpoint(server.address, TOKEN, checkpoint(tmp_path / "ckpt2", seed=1), "v2")
        change(root / "v1" / "model.safetensors")

        dest = tmp_path / "dest"
        with pytest.raises(grpc.RpcError) as err:
            fetch_checkpoint(server.address, TOKEN, dest, version="v1")
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert "'v1' is damaged" in err.value.details() and "'model.safetensors'" in err.value.details()
        assert expected in err.value.details()
        assert nothing_left(dest)

        listed = list_policies(server.address, TOKEN)  # v1 is damaged from now on; v2 is still served
        assert list(listed.versions) == ["v2"] and listed.latest == "v2"
        assert "model.safetensors" in damaged_names(listed)["v1"]
        assert server.refusal("Fetch", pb.FetchRequest(version="v1")).code() == grpc.StatusCode.DATA_LOSS
        assert same_files(fetch_checkpoint(server.address, TOKEN, dest), tmp_path / "ckpt2")


def test_a_damaged_latest_leaves_no_latest_version(tmp_path):
    root = tmp_path / "registry"
    with RegistryServer(root) as server:
        publish_checkpoint(server.address, TOKEN, checkpoint(tmp_path / "a"), "v1")
        publish_checkpoint(server.address, TOKEN, checkpoint(tmp_path / "b", seed=1), "v2")
        tamper(root / "v2" / "config.json")
        assert server.refusal("Fetch", pb.FetchRequest()).code() == grpc.StatusCode.DATA_LOSS
        listed = list_policies(server.address, TOKEN)
        assert (list(listed.versions), listed.latest) == (["v1"], "")
        assert damaged_names(listed)["LATEST"] == "names version 'v2', which is damaged"
        error = server.refusal("Fetch", pb.FetchRequest())
        assert error.code() == grpc.StatusCode.NOT_FOUND and "fetch a version by name" in error.details()
        publish_checkpoint(server.address, TOKEN, checkpoint(tmp_path / "c", seed=2), "v3")  # repairs LATEST
        listed = list_policies(server.address, TOKEN)
        assert listed.latest == "v3" and "LATEST" not in damaged_names(listed)


def test_file_reader_notices_a_file_changing_size_mid_fetch(tmp_path):
    root = tmp_path / "registry"
    published_registry(root, tmp_path, "v1", "v2")
    registry = PolicyRegistry(root, 10**8)
    entry = registry.manifest("v1")["model.safetensors"]
    path = root / "v1" / "model.safetensors"

    reader = registry_module._FileReader(registry, "v1", "model.safetensors", entry)
    assert len(reader.read(50_000)) == 50_000
    os.truncate(path, 100_000)
    reader.read(50_000)  # still there
    with pytest.raises(RegistryError) as err:
        reader.read(50_000)
    reader.close()
    assert err.value.code == grpc.StatusCode.DATA_LOSS and "shrank while being fetched" in str(err.value)
    assert registry.versions() == ["v2"] and "v1: file 'model.safetensors' shrank" in registry.damaged()[0]

    entry = registry.manifest("v2")["model.safetensors"]
    reader = registry_module._FileReader(registry, "v2", "model.safetensors", entry)
    reader.read(entry.size - 1)
    with open(root / "v2" / "model.safetensors", "ab") as file:
        file.write(b"more")
    with pytest.raises(RegistryError) as err:
        reader.read(10)
    reader.close()
    assert err.value.code == grpc.StatusCode.DATA_LOSS and "grew while being fetched" in str(err.value)


# ---------------------------------------------------------------------------------- damage at start


def test_damaged_entries_at_start_are_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "registry"
    folders = published_registry(root, tmp_path, "v1", "tampered", "stray", "badmanifest", "missing")
    tamper(root / "tampered" / "model.safetensors")
    (root / "stray" / "run.py").write_text("import os")
    (root / "badmanifest" / MANIFEST_FILE).write_text("{not json")
    (root / "missing" / "config.json").unlink()
    (root / "empty").mkdir()
    (root / "LATEST").unlink()
    checkpoint(root / "LATEST")  # what older code made of a version named LATEST
    (root / "notes.txt").write_text("garbage")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "bad name").mkdir()
    (root / "link").symlink_to(root / "v1")

    with caplog.at_level("WARNING"), RegistryServer(root) as server:
        listed = list_policies(server.address, TOKEN)
        assert (list(listed.versions), listed.latest) == (["v1"], "")
        damaged = damaged_names(listed)
        assert sorted(damaged) == sorted(
            ["tampered", "stray", "badmanifest", "missing", "empty", "LATEST", "notes.txt", ".DS_Store",
             "bad name", "link"]
        )  # fmt: skip
        assert damaged["tampered"] == "file 'model.safetensors' does not match the sha256 in its manifest"
        assert damaged["stray"].startswith("stray entries ['run.py']")
        assert damaged["badmanifest"].startswith(f"bad {MANIFEST_FILE}")
        assert damaged["missing"] == "files ['config.json'] of its manifest are missing"
        assert damaged["empty"] == "no checkpoint files"
        assert damaged["LATEST"].startswith("is a folder, not the file naming the latest version")
        assert damaged["notes.txt"].startswith("a stray file") and damaged["link"].startswith("a link")
        assert damaged["bad name"].startswith("not a version folder")
        assert all(f"skipping damaged entry {name}" in caplog.text for name in damaged)

        assert same_files(fetch_checkpoint(server.address, TOKEN, tmp_path / "dest", "v1"), folders["v1"])
        error = server.refusal("Fetch", pb.FetchRequest())
        assert error.code() == grpc.StatusCode.NOT_FOUND and "LATEST is a folder" in error.details()
        error = server.refusal("Fetch", pb.FetchRequest(version="tampered"))
        assert error.code() == grpc.StatusCode.DATA_LOSS and "does not match" in error.details()
        assert server.refusal("Fetch", pb.FetchRequest(version="empty")).code() == grpc.StatusCode.DATA_LOSS
        with pytest.raises(grpc.RpcError) as err:  # a damaged version's name stays taken
            publish_checkpoint(server.address, TOKEN, folders["v1"], "tampered")
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

        # The next publish moves the LATEST folder aside (nothing is deleted) and writes the pointer.
        publish_checkpoint(server.address, TOKEN, folders["v1"], "v2")
        listed = list_policies(server.address, TOKEN)
        assert (list(listed.versions), listed.latest) == (["v1", "v2"], "v2")
        moved = [name for name in damaged_names(listed) if name.startswith(".moved-LATEST-")]
        assert len(moved) == 1 and "LATEST" not in damaged_names(listed)
        assert sorted(p.name for p in (root / moved[0]).iterdir()) == ["config.json", "empty.yaml",
                                                                       "model.safetensors"]  # fmt: skip
        assert (root / "LATEST").read_text() == "v2\n"

    with RegistryServer(root) as server:  # and after a restart
        listed = list_policies(server.address, TOKEN)
        assert (list(listed.versions), listed.latest) == (["v1", "v2"], "v2")
        assert moved[0] in damaged_names(listed) and "tampered" in damaged_names(listed)


@pytest.mark.parametrize(
    ("latest", "expected"),
    [
        (b"v9\n", "names version 'v9', which is not in the registry"),
        (b"tampered\n", "names version 'tampered', which is damaged"),
        (b"\xff\xfe\x00", "is unreadable (not text)"),
        (b"\n", "is empty"),
    ],
)
def test_a_bad_latest_at_start_is_reported_and_the_rest_served(tmp_path, latest, expected):
    root = tmp_path / "registry"
    published_registry(root, tmp_path, "v1", "tampered")
    tamper(root / "tampered" / "config.json")
    (root / "LATEST").write_bytes(latest)
    registry = PolicyRegistry(root, 10**8)
    assert registry.versions() == ["v1"] and registry.latest() == ""
    assert f"LATEST: {expected}; the next publish replaces it" in registry.damaged()


def test_an_unreadable_file_at_start_damages_its_version(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    published_registry(root, tmp_path, "v1", "v2")
    real = registry_module.file_sha256

    def file_sha256(path):
        if Path(path).parent.name == "v2":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(registry_module, "file_sha256", file_sha256)
    registry = PolicyRegistry(root, 10**8)
    assert registry.versions() == ["v1"] and registry.latest() == ""
    assert "v2: file 'config.json' is unreadable (Permission denied)" in registry.damaged()
    assert "LATEST: names version 'v2', which is damaged; the next publish replaces it" in registry.damaged()


def test_a_tampered_file_is_caught_at_fetch_when_start_checks_only_sizes(tmp_path):
    root = tmp_path / "registry"
    published_registry(root, tmp_path, "v1")
    tamper(root / "v1" / "model.safetensors")
    with RegistryServer(root, verify_on_start=False) as server:
        assert server.registry.versions() == ["v1"]
        with pytest.raises(grpc.RpcError) as err:
            fetch_checkpoint(server.address, TOKEN, tmp_path / "dest")
        assert err.value.code() == grpc.StatusCode.DATA_LOSS and "does not match" in err.value.details()
        assert nothing_left(tmp_path / "dest") and server.registry.versions() == []


def test_a_version_published_by_older_code_gets_a_manifest(tmp_path, caplog):
    root = tmp_path / "registry"
    old = checkpoint(root / "v0")  # the old layout: files and LATEST, no manifest
    (root / "LATEST").write_text("v0\n")
    (root / ".incoming-0123").mkdir()  # leftovers of a crash: a publish, a LATEST and a manifest update
    (root / ".LATEST.0123").write_text("v0\n")
    (root / "v0" / f"{MANIFEST_FILE}.0123").write_text("{")
    with caplog.at_level("INFO"), RegistryServer(root) as server:
        listed = list_policies(server.address, TOKEN)
        assert (list(listed.versions), listed.latest, list(listed.damaged)) == (["v0"], "v0", [])
        assert f"wrote {MANIFEST_FILE} for version v0" in caplog.text
        manifest = json.loads((root / "v0" / MANIFEST_FILE).read_text())["files"]
        assert manifest == {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256(p.read_bytes())}
            for p in old.iterdir()
            if p.name != MANIFEST_FILE
        }
        fetched = fetch_checkpoint(server.address, TOKEN, tmp_path / "dest")
        names = sorted(p.name for p in fetched.iterdir())
        assert names == ["config.json", "empty.yaml", "model.safetensors"]  # the manifest stays server-side
        assert all((fetched / name).read_bytes() == (old / name).read_bytes() for name in names)
    assert sorted(os.listdir(root)) == ["LATEST", "v0"]
    assert sorted(os.listdir(root / "v0")) == [
        MANIFEST_FILE,
        "config.json",
        "empty.yaml",
        "model.safetensors",
    ]
    assert PolicyRegistry(root, 10**8).damaged() == []  # and the written manifest checks out


def test_a_version_published_by_older_code_is_served_when_its_manifest_cannot_be_written(
    tmp_path, monkeypatch, caplog
):
    root = tmp_path / "registry"
    old = checkpoint(root / "v0")

    def read_only(path, text):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(registry_module, "_write_durably", read_only)
    with caplog.at_level("WARNING"), RegistryServer(root) as server:
        assert "none could be written (Read-only file system)" in caplog.text
        assert same_files(fetch_checkpoint(server.address, TOKEN, tmp_path / "dest", "v0"), old)
        assert server.registry.damaged() == [] and not (root / "v0" / MANIFEST_FILE).exists()


# ------------------------------------------------------------------------------ the client's checks


class FakeRegistry(pb_grpc.RegistryServiceServicer):
    """Streams whatever chunks a test gives it."""

    def __init__(self):
        self.chunks: list[pb.CheckpointChunk] = []

    async def Fetch(self, request, context):  # noqa: N802
        for chunk in self.chunks:
            yield chunk


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        (
            [pb.CheckpointChunk(version="v1", filename="a.json", data=b"{}", last=True, sha256=sha256(b"{ }"))],
            "file 'a.json' does not match its sha256: 2 bytes received hash to",
        ),
        ([pb.CheckpointChunk(version="v1", filename="a.json", data=b"{}", last=True)], "sent no sha256"),
        (
            [pb.CheckpointChunk(version="v1", filename="a.json", data=b"{"),
             pb.CheckpointChunk(filename="a.json", data=b"}", offset=5, last=True, sha256=sha256(b"{}"))],
            "chunk at offset 5, expected 1",
        ),
        ([pb.CheckpointChunk(version="v1", filename="a.json", data=b"{")], "ended without its last chunk"),
        (
            [pb.CheckpointChunk(version="v1", filename="a.json", data=b"{"),
             pb.CheckpointChunk(version="v1", filename="b.json", data=b"{}", last=True, sha256=sha256(b"{}"))],
            "file 'a.json' ended without its last chunk",
        ),
        ([], "the server sent no files"),
    ],
    ids=["wrong-sha256", "no-sha256", "gap", "unfinished", "unfinished-then-next", "empty"],
)  # fmt: skip
def test_fetch_checkpoint_verifies_what_the_server_sent(tmp_path, chunks, expected):
    fake = FakeRegistry()
    fake.chunks = chunks
    with RegistryServer(None, servicer=fake) as server:
        with pytest.raises(CheckpointError) as err:
            fetch_checkpoint(server.address, TOKEN, tmp_path / "dest")
    assert expected in str(err.value) and "nothing was kept" in str(err.value)
    assert nothing_left(tmp_path / "dest")


def test_fetch_checkpoint_refuses_unsafe_names_from_the_server(tmp_path):
    fake = FakeRegistry()
    with RegistryServer(None, servicer=fake) as server:
        for chunk in (
            pb.CheckpointChunk(version="../up", filename="a.json", last=True, sha256=sha256(b"")),
            pb.CheckpointChunk(version="v1", filename="../a.json", last=True, sha256=sha256(b"")),
        ):
            fake.chunks = [chunk]
            with pytest.raises(RegistryError):
                fetch_checkpoint(server.address, TOKEN, tmp_path / "dest")
    assert nothing_left(tmp_path / "dest") and not (tmp_path / "a.json").exists()
