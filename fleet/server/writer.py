"""The episode writer: the threads that own the EpisodeStore, off the request path.

Sessions hand it work through `begin` / `step` / `relabel` / `end` / `abort`, which never wait on the
disk. Work is applied in order, so a relabel at takeover covers exactly the steps that arrived before
it. Only steps count against the bound (`max_pending_steps`): `step` returns False when it is reached
and the caller must refuse that step to its robot (nothing is dropped silently). Episode control
messages are tiny and always accepted, so a takeover's relabel or a disconnect's commit is never lost.

Finished episodes are committed in batches with `EpisodeStore.commit_many` (up to `batch_episodes` per
commit) by a second thread, the committer, so steps keep draining while a commit is on disk. A commit
costs tens of milliseconds whatever its size (every array's last chunk and metadata are rewritten), so
commits are grouped: after one, the next waits until `commit_interval_s` has passed or a full batch is
waiting. An episode that ends on a quiet fleet is committed at once; under load, episodes become
visible up to `commit_interval_s` after they ended. `close` drains everything queued, commits what
ended, commits episodes still open with outcome "shutdown" (success false: kept, and marked as cut
short), and closes the store.

Failures. No exception ends either thread. A step or episode the store refuses (its schema clashes
with what another robot committed first) fails that episode alone: `on_error(key, message)` tells its
robot. A commit that fails for any other reason (disk full, permissions, a damaged store) is retried
with backoff, and meanwhile the writer is not `healthy`: the server refuses new steps with UNAVAILABLE
(the robots keep them and resend), so nothing is acknowledged that cannot be kept. `on_commit(keys)`
reports each committed group, so the server can tell robots which of their messages are durable.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.store import EpisodeStore, OpenEpisode, StepError, StoreError

log = logging.getLogger(__name__)

SHUTDOWN_OUTCOME = "shutdown"
COMMIT_INTERVAL_S = 1.0  # group commits: about one a second, plus one per full batch
RETRY_S = (0.2, 5.0)  # a failed commit is retried after this backoff (doubling up to the second value)
# The writer takes what is queued at most this often. Woken per step, its GIL handoffs with the event
# loop cost more than the step itself; 20 ms of steps is far below any sensible max_pending_steps.
PASS_INTERVAL_S = 0.02
MAX_COMMITTED_KEYS = 10_000  # writer key -> store index of recent commits, for annotations after a commit


def _append_to(extra: dict, name: str, item: Any) -> None:
    extra.setdefault(name, []).append(item)


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
    """`on_error(key, message)` is called (from a writer thread) when episode `key` failed for good;
    `on_commit(keys)` after every successful commit. The server reports both to the robots."""

    def __init__(
        self,
        store: EpisodeStore,
        max_pending_steps: int,
        batch_episodes: int = 16,
        on_error: Callable[[str, str], None] | None = None,
        commit_interval_s: float = COMMIT_INTERVAL_S,
        on_commit: Callable[[list[str]], None] | None = None,
    ):
        self.store = store
        self.max_pending_steps = max_pending_steps
        self.batch_episodes = max(1, batch_episodes)
        self.commit_interval_s = commit_interval_s
        self.stats = WriterStats()
        self._stats_lock = threading.Lock()  # both threads count failures
        self._on_error = on_error or (lambda key, message: None)
        self._on_commit = on_commit or (lambda keys: None)
        self.error = ""  # why the writer is not healthy ("" while it is)
        self._work: collections.deque[_Work] = collections.deque()
        self._pending_steps = 0
        self._cond = threading.Condition()
        self._closing = False
        self._give_up = False  # close() timed out: stop retrying failed commits
        self._paused = False
        self._open: dict[str, OpenEpisode] = {}  # the writer thread's alone
        # Ended episodes waiting for the committer: (key, episode, success, outcome), in the order they ended.
        self._finished: collections.deque[tuple] = collections.deque()
        self._applied_all = False  # the writer thread has ended: commit everything, then end
        self._commit_cond = threading.Condition()
        # Annotations of episodes no longer open, for the committer: (key, name, item, when queued).
        self._annotations: list[tuple[str, str, Any, float]] = []
        self._annotations_waiting: list[
            tuple[str, str, Any, float]
        ] = []  # their episode is not committed yet
        self._committed_index: collections.OrderedDict[str, int] = collections.OrderedDict()  # recent ones
        self._thread = threading.Thread(target=self._run, name="episode-writer", daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="episode-committer", daemon=True)
        self._thread.start()
        self._committer.start()

    # -- called from the server's event loop ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while commits fail (steps must then be refused: they could not be kept)."""
        return not self.error

    @property
    def depth(self) -> int:
        """Queued work items (steps and episode control)."""
        return len(self._work)

    def begin(
        self,
        key: str,
        robot_id: str,
        task: str,
        policy_version: str,
        start_time: float,
        extra: Mapping | None = None,
    ) -> None:
        self._put(
            _Work(
                "begin",
                key,
                dict(
                    robot_id=robot_id,
                    task=task,
                    policy_version=policy_version,
                    start_time=start_time,
                    extra=dict(extra or {}),
                ),
            )
        )

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

    def annotate(self, key: str, name: str, item: Any) -> None:
        """Append `item` to the list `extra[name]` of episode `key`'s metadata: the open episode's, or, once
        it ended, the committed one's (EpisodeStore.update_extra). Applied in order with the other work."""
        self._put(_Work("annotate", key, {"name": name, "item": item}))

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
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._thread, self._committer):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive() and self.error:
                with self._cond:
                    self._give_up = (
                        True  # the store cannot be written: the robots still hold what was not committed
                    )
                thread.join(2 * RETRY_S[1])
            if thread.is_alive():
                log.error(
                    "episode writer did not finish within %s s; the store stays locked until exit", timeout
                )
                return
        self.store.close()

    def _put(self, work: _Work) -> None:
        with self._cond:
            self._work.append(work)
            self._cond.notify()

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._apply_loop()
        finally:  # however the writer thread ends, the committer commits what it was handed and ends too
            with self._commit_cond:
                self._applied_all = True
                self._commit_cond.notify()

    def _apply_loop(self) -> None:
        while True:
            with self._cond:
                while (self._paused or not self._work) and not self._closing:
                    self._cond.wait()
                batch = list(self._work)
                self._work.clear()
                self._pending_steps = 0
                closing = self._closing
            finished = [item for work in batch if (item := self._apply_safely(work)) is not None]
            if closing:
                finished += [(key, episode, False, SHUTDOWN_OUTCOME) for key, episode in self._open.items()]
                self._open.clear()
            if finished:
                with self._commit_cond:
                    self._finished.extend(finished)
                    self._commit_cond.notify()
            if closing:
                return
            time.sleep(PASS_INTERVAL_S)  # let work gather: waking per step costs more than the step

    def _commit_loop(self) -> None:
        """The committer thread: commit ended episodes in groups (see the module docstring)."""
        last_commit = -float("inf")
        while True:
            with self._commit_cond:
                while True:
                    closing = self._applied_all
                    due = last_commit + self.commit_interval_s - time.monotonic()
                    if (
                        closing
                        or self._annotations
                        or (self._finished and (due <= 0 or len(self._finished) >= self.batch_episodes))
                    ):
                        break
                    self._commit_cond.wait(due if self._finished else None)
                count = len(self._finished) if closing else min(len(self._finished), self.batch_episodes)
                group = [self._finished.popleft() for _ in range(count)]
                annotations = self._annotations_waiting + self._annotations
                self._annotations, self._annotations_waiting = [], []
            # Annotations of episodes in this group go into their metadata before the commit.
            in_group = {key: episode for key, episode, _, _ in group}
            for key, name, item, _ in annotations:
                if key in in_group:
                    _append_to(in_group[key].extra, name, item)
            last_commit = time.monotonic()
            for start in range(0, len(group), self.batch_episodes):
                part = group[start : start + self.batch_episodes]
                try:
                    self._commit(part)
                except Exception as err:  # a bug here must not end the thread: fail the group, go on
                    log.exception("episode committer failed")
                    for key, episode, _, _ in part:
                        episode.abort()
                        self._failed(key, f"committing failed: {type(err).__name__}: {err}")
            self._annotate_committed([a for a in annotations if a[0] not in in_group])
            if closing:
                return

    def _annotate_committed(self, annotations: list) -> None:
        """Annotations of committed episodes are written in place; those of episodes still waiting for the
        committer wait with them (a minute at most: an episode that never commits takes none)."""
        waiting = []
        for key, name, item, queued in annotations:
            index = self._committed_index.get(key)
            if index is None:
                if time.monotonic() - queued < 60.0:
                    waiting.append((key, name, item, queued))
                else:
                    log.warning(
                        "annotation %r of episode %s dropped: the episode was never committed", name, key
                    )
                continue
            try:
                self.store.update_extra(index, functools.partial(_append_to, name=name, item=item))
            except Exception:  # the annotation is lost, the writer goes on
                log.exception("could not annotate committed episode %s (%s)", key, name)
        if waiting:
            with self._commit_cond:
                self._annotations_waiting[:0] = waiting

    def _apply_safely(self, work: _Work):
        try:
            return self._apply(work)
        except Exception as err:  # whatever the store raised: this episode fails alone, the thread goes on
            episode = self._open.pop(work.key, None)
            if episode is not None:
                episode.abort()
            self._failed(work.key, f"the episode writer could not {work.op} it: {type(err).__name__}: {err}")
            return None

    def _failed(self, key: str, message: str) -> None:
        with self._stats_lock:
            self.stats.failures += 1
        log.error("episode %s dropped: %s", key, message)
        self._on_error(key, message)

    def _apply(self, work: _Work):
        """Apply one work item; an ended episode comes back as (key, episode, success, outcome)."""
        if work.op == "annotate":
            episode = self._open.get(work.key)
            if episode is not None:
                _append_to(episode.extra, **work.args)
            else:  # ended: the committer applies it before or after the commit
                with self._commit_cond:
                    self._annotations.append(
                        (work.key, work.args["name"], work.args["item"], time.monotonic())
                    )
                    self._commit_cond.notify()
            return None
        if work.op == "begin":
            self._open[work.key] = self.store.begin_episode(**work.args)
            return None
        episode = self._open.get(work.key)
        if episode is None:
            return None  # its episode already failed (reported then) or was never begun
        try:
            if work.op == "step":
                episode.append_checked(work.args["step"])  # decode_step checked it
            elif work.op == "relabel":
                episode.relabel_last(work.args["count"], work.args["label"])
            elif work.op == "end":
                del self._open[work.key]
                return work.key, episode, work.args["success"], work.args["outcome"]
            elif work.op == "abort":
                del self._open[work.key]
                episode.abort()
        except (StepError, StoreError) as err:
            # The server checks steps before queueing them, so this is a clash with the store's schema.
            self._open.pop(work.key, None).abort()
            self._failed(work.key, f"the episode store refused a step, the episode was dropped: {err}")
        return None

    def _commit(self, finished: list) -> None:
        """Commit a group: empty episodes are discarded, episodes that clash with the store's schema fail
        alone, and a failing write is retried until it succeeds (or the writer is closed for good)."""
        keep = []
        for key, episode, success, outcome in finished:
            problem = "" if len(episode) else "empty"
            if problem == "":
                try:
                    problem = self.store.schema_mismatch(episode)
                except Exception as err:  # a damaged store: treat as a failed write, retried below
                    problem = ""
                    log.warning("schema check of episode %s failed: %s", key, err)
            if problem == "empty":
                episode.abort()
                with self._stats_lock:
                    self.stats.episodes_discarded += 1
                log.info("episode %s ended with no steps; nothing to commit", key)
            elif problem:
                episode.abort()
                self._failed(key, f"the episode does not fit the episode store: {problem}")
            else:
                keep.append((key, episode, success, outcome))
        if self.store.schema is None and len(keep) > 1:
            # The first commit fixes the store's schema: commit one alone, then check the rest against it.
            self._commit(keep[:1])
            self._commit(keep[1:])
            return
        if keep:
            self._commit_retrying(keep)

    def _commit_retrying(self, keep: list) -> None:
        delay = RETRY_S[0]
        while True:
            steps = sum(len(episode) for _, episode, _, _ in keep)  # commit_many empties the episodes
            try:
                indices = self.store.commit_many(
                    [(episode, success, outcome) for _, episode, success, outcome in keep]
                )
                break
            except Exception as err:  # disk full, permissions, a damaged store: not this episode's fault
                self.error = f"commit of {len(keep)} episode(s) failed: {type(err).__name__}: {err}"
                log.error(
                    "episode writer: %s; retrying in %.1f s (steps are refused meanwhile)", self.error, delay
                )
                with self._cond:
                    if self._closing and self._give_up:
                        for key, episode, _, _ in keep:
                            episode.abort()
                            self._failed(key, self.error)
                        return
                time.sleep(delay)
                delay = min(delay * 2, RETRY_S[1])
        if self.error:
            log.info("episode writer: commits succeed again")
            self.error = ""
        for (key, _, _, _), index in zip(keep, indices, strict=True):
            self._committed_index[key] = index
        while len(self._committed_index) > MAX_COMMITTED_KEYS:
            self._committed_index.popitem(last=False)
        with self._stats_lock:  # steps first: whoever sees the episode count sees its steps
            self.stats.steps_logged += steps
            self.stats.episodes_committed += len(keep)
        self._on_commit([key for key, _, _, _ in keep])
