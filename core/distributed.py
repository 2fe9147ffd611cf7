"""torch.distributed plumbing for collective ops: resolving a group, agreeing across ranks, starting a group.

Collectives run on torch.distributed (gloo on the CPU, NCCL on CUDA), launched by ``torchrun`` or,
for tests, benchmarks and ``python -m core.autotune``, by ``run_local_group``: worker processes on
the loopback address that rendezvous through a TCP store the parent holds (its port is picked by the
OS, so two groups never race for one). On a call's hot path are only the small queries
(``resolve_group``, ``world_size``, ``rank``, ``backend``) and ``disagreement``, the one small
collective a collective op's verify spends on checking that every rank made the same call.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

from core.errors import SwitchyardError

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
PRELOAD = ("torch", "torch.distributed")  # what the forkserver imports once, for every rank it starts


class LocalGroupError(SwitchyardError, RuntimeError):
    """A rank of a local process group raised, died, or did not finish in time."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def resolve_group(group: Any) -> Any:
    """The group a collective runs over: ``group`` itself, else the default group, else None (a world of one)."""
    if group is not None:
        return group
    if initialized():
        return _dist().group.WORLD
    return None


def world_size(group: Any) -> int:
    group = resolve_group(group)
    return 1 if group is None else int(_dist().get_world_size(group))


def rank(group: Any) -> int:
    group = resolve_group(group)
    return 0 if group is None else int(_dist().get_rank(group))


def backend(group: Any) -> str:
    """The process group's backend ("gloo", "nccl", ...), or "none" for a world of one without a group."""
    group = resolve_group(group)
    return "none" if group is None else str(_dist().get_backend(group)).lower()


def global_rank(group: Any, group_rank: int) -> int:
    """The default-group rank of ``group_rank`` in ``group`` (what point-to-point calls address)."""
    dist = _dist()
    if group is None or group is dist.group.WORLD:
        return group_rank
    return int(dist.get_global_rank(group, group_rank))


def reduce_op(op: str) -> Any:
    """The ``torch.distributed.ReduceOp`` a kernel passes for ``op``; avg is a SUM of pre-divided values."""
    dist = _dist()
    return {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
            "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]


def collective_device(group: Any) -> Any:
    """Where a small control tensor must live for ``group``'s backend: the current CUDA device for NCCL."""
    import torch

    if backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_vouched: set[Any] = set()  # groups whose owners vouch that every rank makes the same calls (see vouch)


def vouch(group: Any) -> None:
    """Mark ``group`` as one whose collective calls are the same on every rank, in the same order, by the
    construction of the code that owns it, so collective ops skip their ranks' call check on it (one
    small collective a call). For a private group only its owner issues calls on: the DDP hooks' copy
    of a group, which carries only DDP's buckets (DDP builds the same buckets on every rank, checks the
    parameters' shapes across ranks when it wraps the model, and runs the hooks in bucket order)."""
    _vouched.add(group)


def vouched(group: Any) -> bool:
    """Whether ``group``'s owner vouched for its calls (``vouch``)."""
    return group in _vouched


def disagreement(description: str, group: Any) -> list[str] | None:
    """Every rank's ``description`` when they are not all equal, else None. A collective on ``group``.

    The common case costs one all_reduce of two integers (the MAX of a hash and of its negation);
    only a mismatch gathers the descriptions themselves so the caller can name the first difference.
    """
    import torch

    dist = _dist()
    digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:8], "little") >> 2
    t = torch.tensor([digest, -digest], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    high, neg_low = t.tolist()
    if high == -neg_low:
        return None
    everyone: list[Any] = [None] * world_size(group)
    dist.all_gather_object(everyone, description, group=group)
    return [str(d) for d in everyone]


# -- launching --------------------------------------------------------------------------------------

def under_launcher() -> bool:
    """True when this process was started by torchrun (or another launcher setting the same variables)."""
    return all(os.environ.get(v) for v in LAUNCHER_ENV)


def init_from_env(timeout: float = 1800.0) -> bool:
    """Under torchrun, initialize the default group from its environment (gloo, or NCCL when CUDA is
    available) unless it already is; returns whether this process runs under a launcher."""
    if not under_launcher():
        return False
    if initialized():
        return True
    import torch

    dist = _dist()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        name = "nccl"
    else:
        name = "gloo"
    dist.init_process_group(name, timeout=datetime.timedelta(seconds=timeout))
    return True


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in names if n.startswith("lo")), None)


def _context() -> Any:
    """Fresh processes from a forkserver that has imported torch once, else spawned ones.

    Both start from a clean interpreter (no inherited threads, CUDA or locks, unlike fork); the
    forkserver saves each rank the import of torch, which costs seconds where the disk is slow.
    """
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return mp.get_context("spawn")


def _worker(rank: int, world_size: int, port: int, timeout: float, env: dict[str, str], results: Any,
            fn: Callable[..., Any], args: Sequence[Any]) -> None:
    """One rank: take the caller's environment, join the group through the parent's store, run ``fn``,
    report its value or its traceback."""
    try:
        os.environ.clear()  # the forkserver's environment is from when it started; use the caller's
        os.environ.update(env)
        import torch
        import torch.distributed as dist

        # Like torchrun: one intra-op thread per rank unless the caller chose otherwise, so ranks
        # sharing a machine do not oversubscribe it (and the tuning cache's fingerprint matches).
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or 1))
        wait = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=wait)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=wait)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        outcome = (rank, True, pickle.dumps(fn(rank, world_size, *args)))
    except BaseException:
        outcome = (rank, False, traceback.format_exc())
    results.put(outcome)
    results.close()
    results.join_thread()  # in the pipe before the group is torn down: errors that other ranks then hit come later
    dist.destroy_process_group()


def run_local_group(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes forming a gloo group on 127.0.0.1.

    ``fn`` must be a module-level (picklable) function, its return value picklable; the processes
    get this process's environment, with gloo bound to the loopback interface. Returns the values in
    rank order. If a rank raises, dies, or the whole run exceeds ``timeout`` seconds, the other
    ranks are killed and ``LocalGroupError`` names the rank and carries its traceback.
    """
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"run_local_group: expected world_size >= 1, got {world_size}")
    ctx = _context()
    # The parent holds the rendezvous store on a port the OS picks, so concurrent groups never collide.
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    env = dict(os.environ)
    loopback = _loopback_interface()
    if loopback is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, store.port, timeout, env, results, fn, args),
                         name=f"switchyard-rank{r}", daemon=True) for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        return _collect(procs, results, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=5)
        results.close()
        del store


def _collect(procs: list[Any], results: Any, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    exited_at: dict[int, float] = {}
    while len(values) < len(procs):
        try:
            rank, ok, value = results.get(timeout=0.05)
        except queue.Empty:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r in values or p.exitcode is None:
                    continue
                if p.exitcode != 0:
                    raise LocalGroupError(f"run_local_group: rank {r} of {len(procs)} died with exit code "
                                          f"{p.exitcode} before reporting a result")
                # A clean exit puts the result in the pipe first; allow it a moment to arrive.
                if now - exited_at.setdefault(r, now) > 10:
                    raise LocalGroupError(f"run_local_group: rank {r} of {len(procs)} exited without reporting a result")
            if now > deadline:
                waiting = [r for r in range(len(procs)) if r not in values]
                raise LocalGroupError(f"run_local_group: ranks {waiting} of {len(procs)} did not finish within "
                                      f"{timeout:g} s; killed them (a hang in a collective?)")
            continue
        if not ok:
            raise LocalGroupError(f"run_local_group: rank {rank} of {len(procs)} raised:\n{value}")
        values[rank] = pickle.loads(value)
    return [values[r] for r in range(len(procs))]
