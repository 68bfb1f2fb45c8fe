"""One place that raises a process's soft limit on open files (RLIMIT_NOFILE).

The fleet server and the console each hold a descriptor per connection (and the server one per stream
file and chunk being written); a service's soft limit is often 1024, which a fleet or a flood runs out.
"""

from __future__ import annotations

import resource

__all__ = ["raise_open_files_limit"]


def raise_open_files_limit(wanted: int | None = None) -> int:
    """Raise the soft limit to `wanted` (None: the hard limit), never above the hard limit and never
    lowering it; returns the soft limit now (``resource.RLIM_INFINITY`` when unlimited)."""
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None or (hard != infinity and wanted > hard) else wanted
    if soft == infinity or (target != infinity and soft >= target):
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target
