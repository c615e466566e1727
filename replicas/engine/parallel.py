"""Tensor parallelism inside one replica: the ranks' process groups, the step message from rank 0 to the
worker ranks, the worker ranks' loop, and rank 0's handle on its workers (`TPWorkers`).

Rank 0 runs the engine (scheduler, sampler). Each step it broadcasts the step's inputs (`StepInputs`, packed
into one int64 tensor) to ranks 1..tp-1 over a gloo control group; every rank then runs the same forward on
its own weight and KV-cache shard (same block ids everywhere), meeting in the all-reduces of the device
group (NCCL on GPU, gloo on CPU). Worker ranks are local processes here (`ProcessWorkers`: benchmarks, tests), or
whatever `TPWorkers` subclass the engine's owner injects (the Serve replica: Ray actors in its placement group,
`replicas.tp_worker.RayWorkers`).

A step that fails on rank 0 (a peer died, a collective timed out, any error) leaves the ranks out of step
for good, so it raises `TPFailure`: the engine does not contain it and the replica must be replaced.
"""
from __future__ import annotations

import abc
import datetime
import gc
import itertools
import logging
import os
import queue
import sys
import threading
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist

from replicas.engine.config import EngineConfig
from replicas.engine.envs import SWITCHES
from replicas.engine.model_runner import ModelRunner, StepInputs, resolve_device_dtype
from replicas.engine.models import ModelArgs, TPInfo
from replicas.engine.sequence import Sequence

log = logging.getLogger(__name__)

# Joining waits for every rank's process to start (spawn, import torch) and reach the store.
_JOIN_TIMEOUT = datetime.timedelta(seconds=300)
# Idle worker ranks wait on the control group for the next step, so their side of it never times out (a
# dead rank 0 still ends the wait at once: its sockets close). Gloo timeouts are per process: rank 0's
# sends to a hung worker time out after tp_timeout_s.
_IDLE_TIMEOUT = datetime.timedelta(days=365)
_INLINE = 1024  # int64s broadcast per step; a larger step sends the rest in a second broadcast
_STOP = -1
_SHUTDOWN_WAIT_S = 2.0


class TPFailure(BaseException):
    """A tensor-parallel step failed, so the ranks are out of step for good. A BaseException on purpose: the
    engine's per-batch error containment must not swallow it. The engine loop stops, its streams stay open,
    and the replica's health check (which sees the dead loop and `check_workers` failing) exits the process:
    the streams then end with ActorDiedError and the router resumes them on another replica."""


# ---------------------------------------------------------------------------- groups


def join_group(config: EngineConfig, rank: int, store: dist.Store) -> tuple[TPInfo, dist.ProcessGroup]:
    """Join this replica's ranks (the default group, used only to join). Returns the model's collectives
    (NCCL on CUDA, else gloo; `tp_timeout_s`) and the gloo control group that carries the step messages."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group (one TP engine per process)")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=config.tp_size, timeout=_JOIN_TIMEOUT)
    timeout = datetime.timedelta(seconds=config.tp_timeout_s)
    control = dist.new_group(backend="gloo", timeout=timeout if rank == 0 else _IDLE_TIMEOUT)
    dev, dtype = resolve_device_dtype(config)
    device = dist.new_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    fast = None
    if dev.type == "cuda" and SWITCHES.tp_allreduce == "symm":
        from replicas.engine.allreduce import SymmAllReduce
        fast = SymmAllReduce.create(device, torch.device("cuda", torch.cuda.current_device()), dtype)
        everywhere = torch.tensor([fast is not None], dtype=torch.int32)
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=control)  # all ranks take the same path
        fast = fast if int(everywhere) else None
    return TPInfo(rank, config.tp_size, device, fast), control


def _store(config: EngineConfig, host: str, port: int, is_master: bool) -> dist.TCPStore:
    return dist.TCPStore(host, port, config.tp_size, is_master=is_master, wait_for_workers=False,
                         timeout=_JOIN_TIMEOUT)


# ---------------------------------------------------------------------------- step messages


def pack_step(step: StepInputs) -> list[int]:
    tables = step.block_tables
    return [len(step.starts), len(step.token_ids), len(step.sample_rows), *step.token_ids, *step.starts,
            *step.lengths, *map(len, tables), *itertools.chain.from_iterable(tables), *step.sample_rows,
            len(step.long_rope), *step.long_rope]


def unpack_step(ints: list[int]) -> StepInputs:
    num_seqs, num_tokens, num_rows = ints[:3]
    it = iter(ints[3:])

    def take(n: int) -> list[int]:
        return list(itertools.islice(it, n))
    token_ids, starts, lengths, table_lens = take(num_tokens), take(num_seqs), take(num_seqs), take(num_seqs)
    tables = [take(n) for n in table_lens]
    rows = take(num_rows)
    return StepInputs(token_ids, starts, lengths, tables, rows, take(next(it)))


class StepChannel:
    """Rank 0 -> worker ranks over the gloo control group: one broadcast of a fixed-size int64 buffer
    [length, packed step...] per step, or the stop message (length -1)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.buf = torch.zeros(_INLINE, dtype=torch.long)

    def send(self, step: StepInputs | None) -> None:
        ints = [] if step is None else pack_step(step)
        msg = torch.tensor([_STOP if step is None else len(ints), *ints], dtype=torch.long)
        if msg.numel() <= _INLINE:
            self.buf[:msg.numel()] = msg
            dist.broadcast(self.buf, 0, group=self.group)
        else:
            dist.broadcast(msg[:_INLINE], 0, group=self.group)
            dist.broadcast(msg[_INLINE:], 0, group=self.group)

    def recv(self) -> StepInputs | None:
        dist.broadcast(self.buf, 0, group=self.group)
        n = int(self.buf[0])
        if n == _STOP:
            return None
        if n < _INLINE:
            return unpack_step(self.buf[1:n + 1].tolist())
        rest = torch.empty(n + 1 - _INLINE, dtype=torch.long)
        dist.broadcast(rest, 0, group=self.group)
        return unpack_step(self.buf[1:].tolist() + rest.tolist())


# ---------------------------------------------------------------------------- worker ranks


class WorkerRank:
    """Rank 1..tp-1: joins rank 0's store, loads its weight shard and KV pool, then runs each step rank 0
    broadcasts until the stop message."""

    def __init__(self, config: EngineConfig, rank: int, host: str, port: int):
        self.rank = rank
        tp, control = join_group(config, rank, _store(config, host, port, is_master=False))
        self.runner = ModelRunner(config, ModelArgs.from_dir(config.model), tp)
        self.channel = StepChannel(control)

    def serve(self) -> None:
        """Blocks until stopped. Raises if rank 0 goes away (its sockets close) or a collective fails."""
        with torch.inference_mode():
            while (step := self.channel.recv()) is not None:
                self.runner.execute(step)
        _release_graphs(self.runner)
        _leave_groups(self.runner.config.tp_timeout_s)  # while rank 0 leaves too


# ---------------------------------------------------------------------------- rank 0


class TPWorkers(abc.ABC):
    """Rank 0's handle on ranks 1..tp-1: starts them (subclasses say how), joins their groups, sends each
    step, health-checks and stops them. Built by the engine from the class it is given (`ProcessWorkers` by
    default)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.failure: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()  # held for a whole step: shutdown sends its stop message between steps
        host = self._host()
        store = _store(config, host, 0, is_master=True)  # port 0: the store binds a free port
        self._start(host, store.port)
        try:
            self.tp, control = join_group(config, 0, store)  # concurrently with the workers' joins
        except BaseException as e:
            self.shutdown(stop_message=False)
            raise RuntimeError(f"tensor-parallel ranks did not join: {e}{self._startup_errors()}") from e
        self.channel = StepChannel(control)

    def make_runner(self, args: ModelArgs) -> "DriverRunner":
        """Rank 0's runner, once every rank has loaded its shard. Stops the workers if that fails."""
        try:
            runner = DriverRunner(self.config, args, self)
            self._runner = runner  # its CUDA graphs go before the groups (see _release_graphs)
            self._wait_ready(self.config.tp_timeout_s)
        except BaseException:
            self.shutdown(stop_message=False)  # the workers are not in their step loop
            raise
        return runner

    @contextmanager
    def step(self):
        """Around one step on rank 0: any error in it is a TPFailure (see the module docstring)."""
        with self._lock:
            if self.failure is not None or self.closed:
                raise TPFailure(f"tensor-parallel group is {'closed' if self.closed else 'broken'}") from self.failure
            try:
                yield
            except Exception as e:
                self.failure = e
                raise TPFailure(f"tensor-parallel step failed; the ranks are out of step: {e!r}") from e

    def check(self, timeout_s: float) -> None:
        """Raise if a step failed or a worker rank is dead or does not answer within timeout_s."""
        if self.failure is not None:
            raise RuntimeError(f"a tensor-parallel step failed: {self.failure!r}")
        self._ping(timeout_s)

    def shutdown(self, stop_message: bool = True) -> None:
        """Stop the worker ranks: the stop message if the engine is between steps, else kill them. No
        process or process group is left behind on any rank."""
        if self.closed:
            return
        self.closed = True  # a later step raises TPFailure
        idle = self._lock.acquire(timeout=_SHUTDOWN_WAIT_S)
        clean = idle and stop_message and self.failure is None and self._send_stop()
        if not clean:
            self._reap(0.0)  # also ends a step stuck in a gloo collective: the peers' sockets close
            idle = idle or self._lock.acquire(timeout=_SHUTDOWN_WAIT_S)
        if idle:  # no step in flight: the groups can go
            _release_graphs(getattr(self, "_runner", None))
            _leave_groups(self.config.tp_timeout_s)  # at the same time as the workers leave theirs
            self._lock.release()
        self._reap(self.config.tp_timeout_s if clean else 0.0)

    def _send_stop(self) -> bool:
        try:
            self.channel.send(None)
            return True
        except Exception:  # noqa: BLE001 - a worker is gone: kill the rest
            log.warning("TP stop message failed; killing the worker ranks", exc_info=True)
            return False

    # Subclasses: how worker ranks run.
    @abc.abstractmethod
    def _host(self) -> str:
        ...

    @abc.abstractmethod
    def _start(self, host: str, port: int) -> None:
        ...

    @abc.abstractmethod
    def _wait_ready(self, timeout_s: float) -> None:
        ...

    def _startup_errors(self) -> str:
        return ""

    @abc.abstractmethod
    def _ping(self, timeout_s: float) -> None:
        ...

    @abc.abstractmethod
    def _reap(self, wait_s: float) -> None:
        """Wait up to wait_s for the workers to end (after the stop message), then kill the rest."""


class DriverRunner(ModelRunner):
    """Rank 0's ModelRunner: each step goes to the worker ranks first, then runs here."""

    def __init__(self, config: EngineConfig, args: ModelArgs, workers: TPWorkers):
        self.workers = workers
        super().__init__(config, args, workers.tp)

    def run(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[list[Sequence], torch.Tensor | None]:
        step, samplers = self.prepare(seqs, num_tokens)
        with self.workers.step():
            self.workers.channel.send(step)
            return samplers, self.execute(step)


class ProcessWorkers(TPWorkers):
    """Worker ranks as local processes (spawned): for benchmarks and tests without Ray. On CUDA, rank r
    uses the r-th visible GPU."""

    def _host(self) -> str:
        return "127.0.0.1"

    def _start(self, host: str, port: int) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self._ready = ctx.Queue()
        gpus = _visible_gpus() if resolve_device_dtype(self.config)[0].type == "cuda" else None
        if gpus is not None and len(gpus) < self.config.tp_size:
            raise RuntimeError(f"tp_size={self.config.tp_size} needs as many GPUs; {len(gpus)} visible")
        self.procs = []
        for rank in range(1, self.config.tp_size):
            p = ctx.Process(target=_process_main, name=f"llm-tp-rank{rank}", daemon=True,
                            args=(self.config.model_dump_json(), rank, host, port,
                                  None if gpus is None else gpus[rank], self._ready))
            p.start()
            self.procs.append(p)

    def _wait_ready(self, timeout_s: float) -> None:
        for _ in self.procs:
            try:
                err = self._ready.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"TP worker ranks not ready within {timeout_s}s") from None
            if err is not None:
                raise RuntimeError(f"TP worker failed to start: {err}")

    def _startup_errors(self) -> str:
        errs = []
        while True:
            try:
                errs.append(self._ready.get_nowait())
            except (queue.Empty, OSError, ValueError):
                break
        return "".join(f"; {e}" for e in errs if e)

    def _ping(self, timeout_s: float) -> None:
        for rank, p in enumerate(self.procs, 1):
            if not p.is_alive():
                raise RuntimeError(f"TP worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}")

    def _reap(self, wait_s: float) -> None:
        for p in self.procs:
            p.join(wait_s)
            if p.is_alive():
                p.kill()
                p.join(5.0)


def _release_graphs(runner: ModelRunner | None) -> None:
    """Destroy the runner's CUDA graphs: NCCL keeps a communicator alive (its destroy and abort wait) while a
    captured graph holds its kernels, which hung every tp-2 run with graphs at exit."""
    if runner is None or runner.graphs is None:
        return
    torch.cuda.synchronize()
    runner.graphs = None
    gc.collect()
    torch.cuda.synchronize()


def _leave_groups(timeout_s: float) -> None:
    """Leave every group (after `_release_graphs`). With CUDA (NCCL), abort the communicators: no peer needs
    to answer, so a rank that is gone or stuck cannot hold this one. Otherwise
    destroy_process_group, bounded: teardown may wait for peers (every rank leaves at once after the stop
    message), and must not hang this process when they are gone."""
    if not dist.is_initialized():
        return
    if torch.cuda.is_initialized():
        try:
            dist.distributed_c10d._abort_process_group()
            return
        except Exception:  # noqa: BLE001 - fall back to the bounded destroy
            log.warning("aborting the tensor-parallel process groups failed", exc_info=True)
    t = threading.Thread(target=dist.destroy_process_group, name="tp-leave-groups", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning("leaving the tensor-parallel process groups did not finish within %.0fs", timeout_s)


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _process_main(config_json: str, rank: int, host: str, port: int, gpu: str | None, ready) -> None:
    try:
        if gpu is not None:  # "cuda" is then this rank's GPU; every GPU stays visible, each rank at its own
            torch.cuda.set_device(rank)  # index (symmetric memory needs distinct device indices)
        worker = WorkerRank(EngineConfig.model_validate_json(config_json), rank, host, port)
    except BaseException as e:
        ready.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    ready.put(None)
    code = 0
    try:
        worker.serve()
    except BaseException:  # noqa: BLE001 - e.g. rank 0 went away
        traceback.print_exc()
        code = 1
    # Skip interpreter teardown (CUDA graphs, NCCL communicators): it can hang, and this rank is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
