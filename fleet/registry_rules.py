"""The policy registry's naming rules, shared by the server (fleet/server/registry.py) and the client
SDK (fleet/client/), which imports nothing of the server: which version names and checkpoint file
names are allowed, and what a SHA-256 looks like."""

from __future__ import annotations

import os
import re

import grpc

from fleet.text import clip

ALLOWED_SUFFIXES = (".json", ".yaml", ".yml", ".safetensors")
MAX_FILENAME_BYTES = 128  # well under every file system's limit (255), with room for temporary suffixes
LATEST_FILE = "LATEST"
RESERVED_VERSIONS = frozenset({LATEST_FILE.casefold()})  # compared case-folded
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class RegistryError(ValueError):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def check_version(version: str) -> str:
    if not _VERSION.fullmatch(version or ""):
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bad version {clip(version)!r}: use letters, digits and . _ + - (not starting with . or -)",
        )
    if version.casefold() in RESERVED_VERSIONS:
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"version {clip(version)!r} is reserved (the registry's {LATEST_FILE} pointer): pick another name"
            " (fetch with an empty version for the latest)",
        )
    return version


def check_filename(name: str) -> str:
    """A checkpoint file name: no directories, no traversal, an allowed suffix."""
    if not name or name != os.path.basename(name) or "\\" in name or name.startswith(".") or "\0" in name:
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bad checkpoint file name {clip(name)!r}: plain names only, no folders or '..'",
        )
    if len(name.encode()) > MAX_FILENAME_BYTES:
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"checkpoint file name of {len(name.encode())} bytes is too long (at most {MAX_FILENAME_BYTES})",
        )
    if not name.endswith(ALLOWED_SUFFIXES):
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"checkpoint file {clip(name)!r} is not allowed: only {', '.join(ALLOWED_SUFFIXES)} files",
        )
    return name


def check_sha256(value: str, what: str) -> str:
    """A SHA-256 in hex (either case); returns it lower-case."""
    if not SHA256_PATTERN.fullmatch(value.lower()):
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{what}: bad sha256 {clip(value)!r} (64 hex digits)"
        )
    return value.lower()
