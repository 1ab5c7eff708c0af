"""Table operations that may block, run off the worker's event loop.

Postfix's proxymap calls its SQL, LDAP and socketmap clients inline, so one
slow server stalls every client of that process. Here a table whose class
sets `blocking = True` gets a lane of its own: a few threads (its share of
the backend's connections) and a bounded number of requests waiting for
them. The loop hands the operation over, keeps serving other clients, and
puts the reply in the connection's reply order when the lane is done (an
eventfd wakes the loop). A request still unanswered after the table's
timeout is answered RETRY, as Postfix answers a table error; a lane that is
full answers RETRY at once. So a slow or dead backend delays only the
requests that need it, and never a file-table lookup of another client.

The loop thread owns every `Pending`: lanes only post (pending, reply)
pairs to a queue, and the loop sets `reply` when it drains that queue or
when the deadline passes, whichever comes first.

For `status`, each lane counts what it does in the `LaneTally` of its
table (kept per table name, so a lane replaced by a reopen adds to the
same totals): requests that found every thread busy (`waits`) and the
time they waited for one, timeouts and rejections; `stats_by_table()`
adds the lanes' sizes and current load (busy threads, requests waiting).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from proxymap.conventions import maillog

#: default threads per blocking table (its concurrent backend operations)
DEFAULT_LANE_SIZE = 4
#: default requests that may wait for a busy lane, beyond those running
DEFAULT_LANE_QUEUE = 64
#: default seconds before an unanswered backend request is answered RETRY
DEFAULT_TIMEOUT = 10.0


class Pending:
    """A reply that a lane is still working on. `owner` is set by the
    event loop (the connection waiting for it); `reply` is the encoded
    reply once known; `counted` is the dispatcher's note for counting it
    then (Dispatcher.count_delivered); `cache` the dispatcher's note for
    its answer cache (Dispatcher.count_delivered too)."""

    __slots__ = ("reply", "owner", "deadline", "retry", "lane", "counted", "cache",
                 "queued_at")

    def __init__(self, lane: "Lane", deadline: float, retry: bytes, queued_at: int = 0):
        self.reply: bytes | None = None
        self.owner = None
        self.counted = None
        self.cache = None
        self.deadline = deadline
        self.retry = retry
        self.lane = lane
        #: time.monotonic_ns() when it was submitted to a lane whose threads
        #: were all busy (0: a thread was free)
        self.queued_at = queued_at


class LaneTally:
    """What the lanes of one table have done, for `status`: requests that
    waited for a thread and the nanoseconds they waited in all, requests
    answered, answered RETRY after the timeout, refused by a full lane."""

    __slots__ = ("waits", "wait_ns", "completed", "timeouts", "rejected")

    def __init__(self):
        self.waits = self.wait_ns = self.completed = self.timeouts = self.rejected = 0


class Lane:
    """The threads and counters of one blocking table instance."""

    def __init__(self, spec: str, size: int, queue_limit: int, timeout: float,
                 tally: LaneTally | None = None):
        self.spec = spec
        self.size = size
        self.queue_limit = queue_limit
        self.timeout = timeout
        self.executor = ThreadPoolExecutor(max_workers=size,
                                           thread_name_prefix=f"lane {spec}")
        self.inflight = 0      # submitted and not yet finished by a thread
        self.tally = tally if tally is not None else LaneTally()

    @property
    def busy(self) -> int:
        """Threads working on a request now."""
        return min(self.inflight, self.size)

    @property
    def waiting(self) -> int:
        """Requests waiting for a thread now."""
        return max(0, self.inflight - self.size)


class Offloader:
    """All lanes of one worker process and the loop's wake-up descriptor."""

    def __init__(self, *, lane_size: int = DEFAULT_LANE_SIZE,
                 lane_queue: int = DEFAULT_LANE_QUEUE, timeout: float = DEFAULT_TIMEOUT):
        self.lane_size = lane_size
        self.lane_queue = lane_queue
        self.timeout = timeout
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._lanes: dict[int, Lane] = {}     # id(table) -> lane
        self._tallies: dict[str, LaneTally] = {}   # table name -> its lanes' totals
        self._outstanding: set[Pending] = set()
        self._used = False

    def fileno(self) -> int:
        return self._wake

    # -- the loop's side --------------------------------------------------------

    def lane_for(self, table) -> Lane:
        lane = self._lanes.get(id(table))
        if lane is None:
            size = int(getattr(table, "lane_size", 0) or self.lane_size)
            timeout = float(getattr(table, "timeout", 0) or self.timeout)
            tally = self._tallies.get(table.spec)
            if tally is None:
                tally = self._tallies[table.spec] = LaneTally()
            lane = self._lanes[id(table)] = Lane(table.spec, size, self.lane_queue, timeout,
                                                 tally)
            self._used = True
        return lane

    def submit(self, table, flags: int, job, retry: bytes) -> Pending | bytes:
        """Run job() (which returns the encoded reply) in the table's lane
        with the request's flags; returns a Pending, or `retry` at once when
        the lane is full."""
        lane = self.lane_for(table)
        if lane.inflight >= lane.size + lane.queue_limit:
            lane.tally.rejected += 1
            maillog.warning(f"table {lane.spec}: {lane.inflight} requests already"
                            f" waiting for the backend -- answering RETRY")
            return retry
        queued_at = 0
        if lane.inflight >= lane.size:      # every thread busy: it waits its turn
            lane.tally.waits += 1
            queued_at = time.monotonic_ns()
        pending = Pending(lane, time.monotonic() + lane.timeout, retry, queued_at)
        lane.inflight += 1
        self._outstanding.add(pending)
        lane.executor.submit(self._run, table, flags, job, pending)
        return pending

    def drain(self, _fileobj=None) -> list[Pending]:
        """Pendings answered since the last call (their `reply` is set);
        those already answered RETRY by expire() are not returned again."""
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        ready = []
        while True:
            try:
                pending, reply, waited_ns = self._done.get_nowait()
            except queue.Empty:
                return ready
            lane = pending.lane
            lane.inflight -= 1
            lane.tally.completed += 1
            lane.tally.wait_ns += waited_ns
            if pending.reply is None:
                pending.reply = reply
                self._outstanding.discard(pending)
                ready.append(pending)

    def expire(self, now: float) -> list[Pending]:
        """Answer RETRY to every pending request past its deadline."""
        late = [p for p in self._outstanding if p.deadline <= now]
        for pending in late:
            self._outstanding.discard(pending)
            pending.reply = pending.retry
            pending.lane.tally.timeouts += 1
            maillog.warning(f"table {pending.lane.spec}: no answer from the backend"
                            f" after {pending.lane.timeout:g}s -- answering RETRY")
        return late

    def retire(self, table) -> None:
        """Close table after the operations already handed to its lane."""
        lane = self._lanes.pop(id(table), None)
        if lane is None:
            close_quietly(table)
            return
        lane.executor.submit(close_quietly, table)
        lane.executor.shutdown(wait=False)

    def stats_by_table(self) -> dict[str, dict]:
        """Per table name: its lanes' threads, busy threads and requests
        waiting now, and the totals of its LaneTally."""
        stats = {spec: {"threads": 0, "busy": 0, "waiting": 0,
                        **{name: getattr(tally, name) for name in LaneTally.__slots__}}
                 for spec, tally in self._tallies.items()}
        for lane in self._lanes.values():
            entry = stats[lane.spec]
            entry["threads"] += lane.size
            entry["busy"] += lane.busy
            entry["waiting"] += lane.waiting
        return stats

    def close(self) -> None:
        """Stop every lane. Once a lane has run, the wake-up descriptor stays
        open (a thread still finishing may write to it) until the process
        exits; a descriptor number must never be reused under a thread."""
        for lane in list(self._lanes.values()):
            lane.executor.shutdown(wait=False, cancel_futures=True)
        self._lanes.clear()
        if not self._used and self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    # -- the lane's side ----------------------------------------------------------

    def _run(self, table, flags: int, job, pending: Pending) -> None:
        # pending.queued_at is set before the submit and never changed after
        waited_ns = time.monotonic_ns() - pending.queued_at if pending.queued_at else 0
        try:
            with table.serving(flags):
                reply = job()
        except BaseException as exc:  # the loop must hear back whatever happens
            maillog.error(f"table {table.spec}: {type(exc).__name__}: {exc}")
            reply = pending.retry
        self._done.put((pending, reply, waited_ns))
        os.eventfd_write(self._wake, 1)


def close_quietly(table) -> None:
    try:
        table.close()
    except Exception as exc:
        maillog.warning(f"close table {table.spec}: {exc}")


class RequestFlags(threading.local):
    """The flags of the request a lane thread is serving (None in the loop)."""

    value: int | None = None
