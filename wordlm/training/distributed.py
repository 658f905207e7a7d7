"""Several processes training one model: torchrun's environment, the process group and its collectives.

Main names: ``World`` (this process's rank, how many processes there are, the few collectives training
needs), ``SINGLE``, ``launched_rank``, ``launched_size``, ``start_world``, ``stop_world``, ``elastic_restarts``,
``lost_contact``, ``lost_contact_message``, ``rank_rng_state`` and ``split_rng_streams``. Must not import Sacred
or any ``wordlm`` module but ``errors`` and ``hidden``.

``torchrun --nproc_per_node=N main.py with ...`` starts N copies of the program and tells each one who
it is through environment variables: ``RANK`` (0 .. WORLD_SIZE-1 over all machines), ``LOCAL_RANK``
(0 .. N-1 on this machine) and ``WORLD_SIZE``. A process started without them, or a world of one, gets
``World()``, whose collectives do nothing: the training code has a single path.

How a batch is shared: ``batch_size`` B stays the global batch. The corpus is laid out in B columns as
for one process, and rank r of N keeps the contiguous block of columns r·B/N .. (r+1)·B/N - 1, carrying
the hidden state of those columns only. With B = 4 and N = 2::

      rank 0  rank 1
     ┌ a g  │ m s ┐
     │ b h  │ n t │
     │ c i  │ o u │
     │ d j  │ p v │
     │ e k  │ q w │
     └ f l  │ r x ┘

Each rank's loss is the mean over its T·B/N targets and DDP averages the gradients over ranks. That
average is the mean over all T·B targets only because every rank has the same number of columns, so
B must be a multiple of N; then N processes compute the gradient one process computes with batch B.
"""

from __future__ import annotations

import io
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from wordlm.errors import UserError
from wordlm.models.hidden import Hidden, map_hidden

__all__ = [
    "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "launched_rank", "launched_size", "World", "SINGLE", "start_world",
    "RESTART_ENV", "elastic_restarts", "stop_world", "lost_contact", "lost_contact_message", "rank_rng_state",
    "split_rng_streams"
]  # fmt: skip

TIMEOUT_ENV = "WORDLM_DIST_TIMEOUT"  # seconds a collective may wait for the other processes
DEFAULT_TIMEOUT_S = 600


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 for a process torchrun did not start)."""
    return int(os.environ.get("RANK") or 0)


def launched_size() -> int:
    """How many processes torchrun started for this run, over all machines (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run, and the collectives between them.

    Every method is a collective when ``size > 1``: all ranks must call it, in the same order.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that prints, records the run and writes checkpoints."""
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous block of ``count`` columns (blocks differ in size by at most one)."""
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all), stacked in rank order: (size, *shape)."""
        local = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.stack(parts).to(tensor.device)

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over ranks, identical to the last bit on every rank.

        The parts are added in rank order on every rank, so decisions taken on the result (a loss is
        NaN, validation improved) are the same everywhere, whatever order an all-reduce would use.
        """
        return tensor if self.size == 1 else self._gather(tensor).sum(0)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (see ``total``)."""
        return tensor if self.size == 1 else self.total(tensor) / self.size

    def agree(self, *values: int) -> tuple[int, ...]:
        """The largest of each value over ranks: what any rank raised (a stop, a due checkpoint) all see."""
        if self.size == 1:
            return values
        return tuple(int(v) for v in self._gather(torch.tensor(values, dtype=torch.int64)).amax(0).tolist())

    def gather_columns(self, hidden: Hidden | None) -> Hidden | None:
        """Put the ranks' column blocks of a hidden state side by side: (L, B/N, H) → (L, B, H) per tensor.

        Every shape of state (a tensor, the LSTM's pair, the layered models' list) is gathered tensor by
        tensor; ``None`` stays ``None``.
        """
        if self.size == 1:
            return hidden
        return map_hidden(lambda part: torch.cat(list(self._gather(part).unbind(0)), dim=1), hidden)

    def take_columns(self, hidden: Hidden | None) -> Hidden | None:
        """This rank's block of the columns of a whole-batch hidden state (the inverse of ``gather_columns``)."""
        if self.size == 1:
            return hidden
        return map_hidden(lambda part: part[:, self.share(part.size(1))].contiguous(), hidden)

    def gather_data(self, value) -> list:
        """Every rank's ``value``, plain data as a checkpoint holds (e.g. RNG states), in rank order.

        A value travels as the bytes of ``torch.save`` in a uint8 tensor (padded to the longest rank's,
        with its length gathered first) and is read back with ``torch.load(weights_only=True)``: the
        tensors inside (numpy's uint32 RNG key among them) survive, and nothing received can run code,
        because no pickle is ever loaded (``all_gather_object`` would unpickle what the others send).
        """
        if self.size == 1:
            return [value]
        buffer = io.BytesIO()
        torch.save(value, buffer)
        local = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
        lengths = self._gather(torch.tensor([local.numel()], dtype=torch.int64)).view(-1).tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[: local.numel()] = local
        received = self._gather(padded)  # (size, longest)
        return [
            torch.load(io.BytesIO(received[rank, :length].numpy().tobytes()), weights_only=True)
            for rank, length in enumerate(lengths)
        ]

    @contextmanager
    def local_rank_first(self):
        """Run the block on each machine's local rank 0 first, then on the other ranks.

        What the block writes on the first pass (a download, a cache entry) the others then read.
        """
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def barrier(self) -> None:
        """Wait until every rank is here (nothing to wait for in a world of one)."""
        if self.size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel, which averages gradients over ranks in backward."""
        if self.size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


SINGLE = World()  # a process on its own: every collective returns its input


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def start_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the other processes of a torchrun job: gloo on CPU, NCCL on CUDA, one GPU per process.

    Args:
        device: the device the ``device`` key chose; ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Returns:
        ``(world, device)``: ``World()`` and ``device`` unchanged when torchrun did not start this
        process with more than one process in the job.

    Raises:
        UserError: a GPU index was given to several processes, or this machine has too few GPUs.
    """
    size = launched_size()
    if size <= 1:
        return World(device=device), device
    rank, local_rank = launched_rank(), int(os.environ.get("LOCAL_RANK") or 0)
    timeout = _timeout()
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(
                f"device={device} names one GPU, but each of the {size} processes takes its own "
                "(cuda:LOCAL_RANK); use device=cuda or device=auto"
            )
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process LOCAL_RANK={local_rank} has no GPU of its own: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per machine (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=_store(rank, size, timeout), rank=rank, world_size=size,
                                timeout=timeout, device_id=device)  # fmt: skip
    else:
        dist.init_process_group("gloo", store=_store(rank, size, timeout), rank=rank, world_size=size, timeout=timeout)
    return World(rank=rank, size=size, local_rank=local_rank, device=device), device


def _store(rank: int, size: int, timeout: timedelta) -> dist.Store:
    """The key-value store the processes meet in (``MASTER_ADDR:MASTER_PORT``, as ``env://`` reads them), its keys
    under a prefix of their own for each start of the workers (``_meet``).

    torchrun's agent hosts the store and keeps it across a restart of the workers (``--max-restarts``); plain
    ``env://`` would then read the addresses the killed workers had published and fail in Gloo's
    ``connectFullMesh`` ("Connection refused") or hang. Without the agent's store, rank 0 hosts one.
    """
    store, start, _ = _meet(rank, size, timeout)
    if store is None:  # let go by stop_world: the ranks met for one run (its start number counts torchrun's restarts)
        raise UserError("under torchrun each process trains one run; start the job again for another")
    return dist.PrefixStore(f"wordlm/start_{start}", store)


RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # torchrun's count of the times it restarted the workers (0 at first)
_MET: dict = {}  # this process's meeting with the other ranks (_meet): once per process


def elastic_restarts() -> int:
    """How often torchrun has restarted the workers of this job: 0 at the first start, or without torchrun; the same
    number on every rank, which meet for it in torchrun's store when there are several (``_meet``)."""
    if launched_size() <= 1 or RESTART_ENV not in os.environ:
        return _counted_restarts()
    return _meet(launched_rank(), launched_size(), _timeout())[2]


def _counted_restarts() -> int:
    try:
        return int(os.environ.get(RESTART_ENV) or 0)
    except ValueError:
        return 0


def _meet(rank: int, size: int, timeout: timedelta) -> tuple[dist.Store, int, int]:
    """Connect to the store and agree with the other ranks on ``(store, start, restarts)``: which start of the
    workers this is in the store (its keys' prefix) and how often torchrun restarted them.

    torchrun counts restarts per machine (``TORCHELASTIC_RESTART_COUNT``), and a machine whose workers were healthy
    when another machine's failed restarts them with its count unchanged: ranks that went by their own count met
    under different prefixes and waited there for each other, and one resumed while the other started over. Rank 0
    numbers the starts in the store and tells each other rank. An earlier start's keys stay in the agent's store, so
    each rank asks under a name of its own; rank 0 answers every name it finds (an earlier one's answer is never
    read) until each rank has said that it heard, with its machine's count. ``restarts`` is the largest count, or
    the number of earlier starts of rank 0 in the agent's store (it lives as long as the job) if that is larger.
    """
    if _MET:
        return _MET["store"], _MET["start"], _MET["restarts"]
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise UserError(
            f"WORLD_SIZE={size} says this is one of several processes, but MASTER_ADDR and MASTER_PORT do not say "
            "where they meet; start them with torchrun"
        ) from None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(host, port, size, is_master=not agent and rank == 0, timeout=timeout)
    counted = _counted_restarts()
    if rank > 0:
        name = uuid.uuid4().hex
        store.set(f"wordlm/ask/{rank}", name)
        start = int(store.get(f"wordlm/answer/{name}"))
        store.set(f"wordlm/heard/{start}/{rank}", str(counted))
        restarts = int(store.get(f"wordlm/restarts/{start}"))
    else:
        start, counts, answered = store.add("wordlm/starts", 1), [counted], {}
        waiting, deadline = set(range(1, size)), time.monotonic() + timeout.total_seconds()
        while waiting:
            for other in sorted(waiting):
                asked, heard = f"wordlm/ask/{other}", f"wordlm/heard/{start}/{other}"
                if store.check([heard]):
                    counts.append(int(store.get(heard)))
                    waiting.discard(other)
                elif store.check([asked]) and (name := store.get(asked).decode()) != answered.get(other):
                    store.set(f"wordlm/answer/{name}", str(start))
                    answered[other] = name
            if waiting and time.monotonic() > deadline:
                raise UserError(
                    f"process 0 of {size} waited {timeout.total_seconds():g} s for processes {sorted(waiting)} to "
                    f"start; raise {TIMEOUT_ENV} if they start that slowly"
                )
            time.sleep(0.01 if waiting else 0)
        restarts = max(*counts, start - 1)  # (rank 0's own store, without the agent's: start 1)
        store.set(f"wordlm/restarts/{start}", str(restarts))
    _MET.update(store=store, start=start, restarts=restarts)
    return store, start, restarts


def stop_world() -> None:
    """Leave the process group, if this process joined one, and let go of the store the ranks met in.

    Both now, while the interpreter is whole: torch's objects left for its shutdown (Gloo's threads, a store's
    connection) can abort the process there ("terminate called without an active exception", seen once on rank 0
    of a run stopped by SIGTERM), and torchrun then reports a finished run as failed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _MET:
        _MET["store"] = None  # the meeting's answers stay (elastic_restarts); the connection goes


def lost_contact(problem: BaseException) -> bool:
    """Whether ``problem`` says another process of this run is gone (it crashed, was killed, timed out).

    Gloo reports a vanished peer from inside DDP's backward as a plain ``RuntimeError`` naming its
    transport, so the message is looked at too; outside a process group nothing counts.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(problem, dist.DistError):
        return True
    return isinstance(problem, RuntimeError) and bool(re.search(r"gloo|nccl|connection|timed out", str(problem), re.I))


def lost_contact_message(problem: BaseException) -> str:
    """One line naming this process and the transport's complaint, without its source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(problem).split())).split(". ")[0][:160]
    return f"process {dist.get_rank()} of {dist.get_world_size()} lost contact with the others ({text})"


def rank_rng_state(training: dict, world: World) -> tuple[dict, bool]:
    """The RNG state this rank resumes with, and whether it is the one this rank saved.

    A checkpoint of N processes holds each rank's state (``rng_by_rank``) besides rank 0's (``rng``,
    all a single process saves). Resumed by as many processes, every rank takes its own: the dropout
    masks continue exactly. Otherwise every rank takes rank 0's, and ``split_rng_streams`` must follow.
    """
    by_rank = training.get("rng_by_rank")
    if by_rank and len(by_rank) == world.size:
        return by_rank[world.rank], True
    return training["rng"], world.rank == 0


def split_rng_streams(world: World) -> None:
    """Give each rank > 0 a torch random stream of its own, drawn from the current one.

    All ranks start from Sacred's seed, so they build the same initial weights; left alone they would
    also draw the same dropout mask for each rank's block of columns. Rank 0 keeps its stream, so a
    single process and rank 0 draw alike.
    """
    if world.rank > 0:
        torch.manual_seed(int(torch.randint(2**62, ())) + world.rank)
