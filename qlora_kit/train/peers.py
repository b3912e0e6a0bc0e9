"""The other processes of a multi-process run: which one died, and which survivor says so.

A rank that fails with an error prints it itself (train/distributed.py); a rank that is killed
(``kill -9``, the kernel's out-of-memory killer) prints nothing, and its peers only see a
collective fail.  So every rank records each rank's host and PID when the run starts, a rank
that fails with its own error says so in the launcher's key-value store before it leaves, and
when a peer is lost without one, the first survivor to claim it in the store prints one
``error:`` line naming the dead rank (from its PID, on this host).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

log = logging.getLogger("qlora_kit")

Peers = tuple[tuple[str, int], ...]  # (host name, PID) per rank
_FAILED_KEY = "qlora_kit/rank_failed"  # set by a rank that reports its own error
_LOST_KEY = "qlora_kit/peer_lost_reported"  # incremented by survivors: the first one reports
STORE_TIMEOUT = timedelta(seconds=10)


def record_peers(group: Any) -> Peers:
    """Every rank's (host name, PID), in rank order (a collective: every rank calls it once, at the start)."""
    import torch.distributed as dist

    mine = (socket.gethostname(), os.getpid())
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine, group=group)
    return tuple((str(host), int(pid)) for host, pid in every)


def dead_ranks(peers: Peers, rank: int) -> list[tuple[int, int]]:
    """(rank, PID) of the other ranks on this host whose process is gone (or a zombie not yet reaped)."""
    host = socket.gethostname()
    return [(r, pid) for r, (h, pid) in enumerate(peers) if r != rank and h == host and not _alive(pid)]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone (NoSuchProcess) or not ours to see: not known to be alive
        return False


def describe_lost(peers: Peers, rank: int) -> str:
    """Which peer was lost, for the error line: "...: rank 1 (PID 4242) died" when it is gone from this host."""
    dead = dead_ranks(peers, rank)
    if not dead:
        return "another process of this run failed"
    return "another process of this run failed: " + ", ".join(f"rank {r} (PID {pid})" for r, pid in dead) + " died"


def collective_reason(text: str) -> str:
    """A collective's error, short: gloo's "[.../pair.cc:537] Read error [addr]:port: Connection reset by peer. This
    is typically ..." becomes "Read error [addr]:port: Connection reset by peer"."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    if first.startswith("[") and "] " in first:
        first = first.split("] ", 1)[1]
    return first.split(". ", 1)[0][:160]


def _store() -> Any | None:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set_timeout(STORE_TIMEOUT)
        return store
    except Exception:  # no process group, or the store is gone with the rank that hosted it
        return None


def mark_failed(rank: int) -> None:
    """Tell the other ranks that this one reports its own error (so they stay quiet about losing it)."""
    store = _store()
    try:
        if store is not None:
            store.set(_FAILED_KEY, str(rank))
    except Exception as exc:  # best effort: the error itself is what matters
        log.debug("could not record the failure in the store: %s", exc)


def claim_report() -> bool:
    """True for the one survivor that reports a peer lost without a word (none when the lost rank reported itself).

    Without a reachable store (it went down with the rank hosting it) every survivor reports.
    """
    store = _store()
    if store is None:
        return True
    try:
        if store.check([_FAILED_KEY]):
            return False
        return int(store.add(_LOST_KEY, 1)) == 1
    except Exception:
        return True
