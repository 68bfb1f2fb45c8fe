"""The episode writer: the one thread that owns the EpisodeStore, off the request path.

Sessions hand it work through `begin` / `step` / `relabel` / `end` / `abort`, which never wait on the
disk. Work is applied in order, so a relabel at takeover covers exactly the steps that arrived before
it. Only steps count against the bound (`max_pending_steps`): `step` returns False when it is reached
and the caller must refuse that step to its robot (nothing is dropped silently). Episode control
messages are tiny and always accepted, so a takeover's relabel or a disconnect's commit is never lost.

Finished episodes are committed in batches with `EpisodeStore.commit_many` (everything that ended since
the last pass, up to `batch_episodes` per commit). `close` drains everything queued, commits what ended,
commits episodes still open with outcome "shutdown" (success false: kept, and marked as cut short), and
closes the store.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.store import EpisodeStore, OpenEpisode, StepError, StoreError

log = logging.getLogger(__name__)

SHUTDOWN_OUTCOME = "shutdown"


@dataclass
class WriterStats:
    steps_logged: int = 0
    episodes_committed: int = 0
    episodes_discarded: int = 0  # ended with no steps (a store cannot hold an empty episode)
    failures: int = 0


@dataclass
class _Work:
    op: str  # begin | step | relabel | end | abort
    key: str
    args: dict[str, Any] = field(default_factory=dict)


class EpisodeWriter:
    """`on_error(key, message)` is called (from the writer thread) when a step or commit of episode
    `key` fails; the server reports it to the robot."""

    def __init__(self, store: EpisodeStore, max_pending_steps: int, batch_episodes: int = 16,
                 on_error: Callable[[str, str], None] | None = None):
        self.store = store
        self.max_pending_steps = max_pending_steps
        self.batch_episodes = max(1, batch_episodes)
        self.stats = WriterStats()
        self._on_error = on_error or (lambda key, message: None)
        self._work: collections.deque[_Work] = collections.deque()
        self._pending_steps = 0
        self._cond = threading.Condition()
        self._closing = False
        self._paused = False
        self._open: dict[str, OpenEpisode] = {}
        self._thread = threading.Thread(target=self._run, name="episode-writer", daemon=True)
        self._thread.start()

    # -- called from the server's event loop ------------------------------------------------------

    @property
    def depth(self) -> int:
        """Queued work items (steps and episode control)."""
        return len(self._work)

    def begin(self, key: str, robot_id: str, task: str, policy_version: str, start_time: float,
              extra: Mapping | None = None) -> None:
        self._put(_Work("begin", key, dict(robot_id=robot_id, task=task, policy_version=policy_version,
                                           start_time=start_time, extra=dict(extra or {}))))

    def step(self, key: str, flat_step: Mapping[str, Any]) -> bool:
        """Queue one flat step; False (and nothing queued) when `max_pending_steps` are waiting."""
        with self._cond:
            if self._closing or self._pending_steps >= self.max_pending_steps:
                return False
            self._pending_steps += 1
            self._work.append(_Work("step", key, {"step": flat_step}))
            self._cond.notify()
        return True

    def relabel(self, key: str, count: int, label) -> None:
        self._put(_Work("relabel", key, {"count": count, "label": label}))

    def end(self, key: str, success: bool, outcome: str) -> None:
        self._put(_Work("end", key, {"success": success, "outcome": outcome}))

    def abort(self, key: str) -> None:
        self._put(_Work("abort", key))

    @contextlib.contextmanager
    def paused(self):
        """Hold the writer (queued work waits) while inside; for maintenance and for tests of back-pressure."""
        with self._cond:
            self._paused = True
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Apply everything queued, commit open episodes as "shutdown", close the store."""
        with self._cond:
            self._closing = True
            self._paused = False
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("episode writer did not finish within %s s; the store stays locked until exit", timeout)
            return
        self.store.close()

    def _put(self, work: _Work) -> None:
        with self._cond:
            self._work.append(work)
            self._cond.notify()

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while (self._paused or not self._work) and not self._closing:
                    self._cond.wait()
                batch = list(self._work)
                self._work.clear()
                self._pending_steps = 0
                closing = self._closing
            finished = [item for work in batch if (item := self._apply(work)) is not None]
            if closing:
                finished += [(key, episode, False, SHUTDOWN_OUTCOME) for key, episode in self._open.items()]
                self._open.clear()
            for start in range(0, len(finished), self.batch_episodes):
                self._commit(finished[start:start + self.batch_episodes])
            if closing:
                return

    def _apply(self, work: _Work):
        """Apply one work item; an ended episode comes back as (key, episode, success, outcome)."""
        if work.op == "begin":
            self._open[work.key] = self.store.begin_episode(**work.args)
            return None
        episode = self._open.get(work.key)
        if episode is None:
            return None  # its episode already failed (reported then) or was never begun
        try:
            if work.op == "step":
                episode.append_flat(work.args["step"])
            elif work.op == "relabel":
                episode.relabel_last(work.args["count"], work.args["label"])
            elif work.op == "end":
                del self._open[work.key]
                return work.key, episode, work.args["success"], work.args["outcome"]
            elif work.op == "abort":
                del self._open[work.key]
                episode.abort()
        except (StepError, StoreError) as err:
            # The server validates steps before queueing them, so this is a schema clash with the store.
            self._open.pop(work.key, None).abort()
            self.stats.failures += 1
            log.error("episode %s dropped: %s", work.key, err)
            self._on_error(work.key, f"episode writer refused a step, the episode was dropped: {err}")
        return None

    def _commit(self, finished: list) -> None:
        keep = []
        for key, episode, success, outcome in finished:
            if len(episode):
                keep.append((key, episode, success, outcome))
            else:
                episode.abort()
                self.stats.episodes_discarded += 1
                log.info("episode %s ended with no steps; nothing to commit", key)
        if not keep:
            return
        steps = sum(len(episode) for _, episode, _, _ in keep)  # commit_many empties the episodes
        try:
            self.store.commit_many([(episode, success, outcome) for _, episode, success, outcome in keep])
        except Exception as err:  # disk full, permissions...: report each episode, keep the thread alive
            self.stats.failures += len(keep)
            log.exception("commit of %d episode(s) failed", len(keep))
            for key, episode, _, _ in keep:
                episode.abort()
                self._on_error(key, f"committing the episode failed: {type(err).__name__}: {err}")
            return
        self.stats.episodes_committed += len(keep)
        self.stats.steps_logged += steps
