"""Strings from outside (robots, operators, files) made safe to echo in an error message."""

from __future__ import annotations


def clip(text: str, limit: int = 48) -> str:
    """`text`, never longer than `limit` characters: a whole 20 kB id in a status message would overflow
    gRPC's metadata limit and hide the real error, and a log line would grow as large."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"
