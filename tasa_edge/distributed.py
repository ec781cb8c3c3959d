"""Data-parallel analysis over torch.distributed ranks (``torchrun``, ``accelerate launch``, srun).

A job started by a launcher has ``WORLD_SIZE`` > 1 and ``RANK`` / ``MASTER_ADDR`` /
``MASTER_PORT`` in its environment (the ``env://`` rendezvous). Every rank loads the model and
builds the same sample pools; the pool samples are dealt round-robin over the ranks (sample j to
rank j mod N), each rank takes the gradient statistics of its share, and then

* the Fisher sums are **all-reduced** (summed over ranks: they are additive in every form,
  :mod:`tasa_edge.fisher`), as are the per-source sample counts;
* the per-sample records (gradient traces, activation sums, token counts) are all-gathered, so every
  rank holds the statistics of the whole pool, exactly as one process would have computed them
  (up to the order of the floating-point sums);
* the sensitivity pass (quantize -> dequantize of every tensor in every format) is dealt over the
  ranks by tensor and its rows gathered;
* rank 0 alone writes the outputs (analysis.json, imatrix.gguf, the merged gradient cache); each
  rank keeps the cache of its own share while it works, so an interrupted job resumes.

Backends: gloo on CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``). Failures of the job
(a rank that dies, a rank that never joins, ranks that disagree about the model, the data or the
configuration) end every surviving rank with one line and no analysis.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from .errors import TasaError

#: seconds a rank waits for the others (to join, or inside a collective) before giving up
DEFAULT_TIMEOUT = 600


class DistributedError(TasaError):
    """The distributed job failed (a rank died or never joined): the environment, not the input."""

    exit_code = 1


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence) -> list:
        """This rank's share of ``items`` (round-robin: item j goes to rank j mod world)."""
        return list(items[self.rank::self.world])


def launched() -> bool:
    """Whether this process was started by a launcher as one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise TasaError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def init(device: str, timeout_s: float = DEFAULT_TIMEOUT) -> Ranks | None:
    """Join the job described by the environment (None when not launched as several ranks)."""
    if not launched():
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    except KeyError as exc:
        raise TasaError(f"WORLD_SIZE is set but {exc.args[0]} is not: start the ranks with torchrun "
                        f"or set RANK, MASTER_ADDR and MASTER_PORT") from None
    except ValueError as exc:
        raise TasaError(f"bad distributed environment: {exc}") from None
    if not 0 <= rank < world:
        raise TasaError(f"RANK={rank} is outside WORLD_SIZE={world}")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_available():
        raise TasaError("this torch build has no torch.distributed")
    with collective(f"rank {rank} could not join the job at "
                    f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s"):
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    r = Ranks(rank, world, local, backend)
    print(f"rank {rank}/{world} joined ({backend})", file=sys.stderr, flush=True)
    return r


def device_of(ranks: Ranks | None, device: str) -> str:
    """The device a rank computes on: its own GPU under NCCL."""
    if ranks is not None and ranks.backend == "nccl":
        return f"cuda:{ranks.local_rank}"
    return device


def finish(ranks: Ranks | None) -> None:
    if ranks is not None and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed rendezvous or collective (a peer closed its connection, a timeout) into one line."""
    try:
        yield
    except (RuntimeError, ValueError, OSError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DistributedError(f"distributed analysis failed: {what} ({first})") from None


def agree(ranks: Ranks, what: str, value: str) -> None:
    """Every rank must hold the same ``value`` (e.g. the model fingerprint); else one line on all."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    got: list = [None] * ranks.world
    with collective(f"a rank left the job while checking the {what}"):
        dist.all_gather_object(got, digest)
    bad = [i for i, d in enumerate(got) if d != got[0]]
    if bad:
        raise TasaError(f"distributed analysis: rank(s) {', '.join(map(str, bad))} have another {what} "
                        f"than rank 0; every rank must analyse the same model with the same options")


def all_sum_(t: torch.Tensor, what: str) -> None:
    """In-place sum over ranks (float64 on the wire for float32 statistics)."""
    with collective(f"a rank left the job while summing the {what}"):
        if t.dtype == torch.float32:
            w = t.double()
            dist.all_reduce(w)
            t.copy_(w)
        else:
            dist.all_reduce(t)


def all_gather(obj, what: str) -> list:
    """Every rank's ``obj`` (plain Python data of this job's own ranks), in rank order."""
    got: list = [None] * dist.get_world_size()
    with collective(f"a rank left the job while gathering the {what}"):
        dist.all_gather_object(got, obj)
    return got


def barrier(what: str) -> None:
    with collective(f"a rank left the job {what}"):
        dist.barrier()
