"""Training on several processes (``torchrun``): the exact global B x B objective across ranks.

Every rank builds the same global batch (B images, B captions, one t, one noise: the data order
and the trainer's generator are functions of seed and step) and evaluates only its share of
the image rows against all B captions. SoftREPA's cross-entropy and AGSM's targets are per image
row, so the rows are independent: each rank backpropagates the sum of its rows' losses divided
by the global B, and one all-reduce (sum) of the token gradients gives every rank the
single-process gradient, up to floating-point summation order. The optimizer, LR schedule and
AGSM EMA then step identically on every rank. The official code instead keeps negatives local
to each GPU, so its contrastive matrix shrinks as GPUs are added.

Validation splits the alignment score's caption groups across ranks and sums the counts. Only
rank 0 writes files. Per step, one all-reduce carries the token gradient (fp32, the size of the
token parameters) plus a few loss statistics.

Backends: NCCL when CUDA is available (each rank on ``cuda:$LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

DEFAULT_TIMEOUT_S = 600.0  # NCCL's and gloo's own default: a collective waits this long for a lost rank


class RankFailure(RuntimeError):
    """A collective failed: another rank died, was killed, or stopped responding within the timeout."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``Dist()`` is a single process (every method a no-op)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> torch.Tensor:
        """This rank's image rows of a batch of n: a contiguous share, sizes differing by at most one."""
        return torch.tensor_split(torch.arange(n), self.world_size)[self.rank]

    def groups(self, n: int) -> range:
        """This rank's share of n validation groups (every world_size-th, from its rank)."""
        return range(self.rank, n, self.world_size)

    def all_reduce_sum_(self, buf: torch.Tensor, what: str = "a collective") -> torch.Tensor:
        """Sum ``buf`` over the ranks in place (no-op on one process); a lost rank raises RankFailure."""
        if self.enabled:
            try:
                torch.distributed.all_reduce(buf)
            except Exception as e:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError, ...)
                raise RankFailure(f"rank {self.rank}/{self.world_size}: {what} failed, so another rank died, was "
                                  f"killed or stopped responding ({type(e).__name__}: {e})") from e
        return buf

    def broadcast(self, obj, what: str = "a broadcast"):
        """Rank 0's ``obj`` on every rank (a picklable object; no-op on one process)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        try:
            torch.distributed.broadcast_object_list(box, src=0)
        except Exception as e:
            raise RankFailure(f"rank {self.rank}/{self.world_size}: {what} failed ({type(e).__name__}: {e})") from e
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Collective check before heavy work: if any rank hit an error, raise it (the lowest rank's)
        on every rank, so a bad input stops the whole job at once instead of a timeout later."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        found = [None] * self.world_size
        try:
            torch.distributed.all_gather_object(found, None if error is None else (type(error).__name__, str(error)))
        except Exception as e:
            raise RankFailure(f"rank {self.rank}/{self.world_size}: the start-up check failed "
                              f"({type(e).__name__}: {e})") from e
        for rank, item in enumerate(found):
            if item is not None:
                if error is not None and rank == self.rank:
                    raise error
                kind = FileExistsError if item[0] == "FileExistsError" else ValueError
                raise kind(f"rank {rank}: {item[1]}")


SINGLE = Dist()


def launched() -> bool:
    """True inside a multi-process ``torchrun`` job (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the ``torchrun`` job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL with CUDA, else gloo. Outside torchrun: ``SINGLE``."""
    if not launched():
        return SINGLE
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s}")
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(d.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout_s))
    return d


def device(d: Dist, requested: str | None = None) -> torch.device:
    """The rank's device: ``cuda:$LOCAL_RANK`` with CUDA, else cpu. ``requested`` may only name the
    type ("cuda", "cpu"): under torchrun the index comes from LOCAL_RANK."""
    if not d.enabled:
        return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if requested is not None and torch.device(requested).index is not None:
        raise ValueError(f"--device {requested}: under torchrun each rank uses cuda:$LOCAL_RANK; pass --device cuda "
                         "or cpu, and choose GPUs with CUDA_VISIBLE_DEVICES")
    kind = torch.device(requested).type if requested else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(kind, d.local_rank) if kind == "cuda" else torch.device(kind)


def shutdown() -> None:
    """Leave the process group (after a normal end, which every rank reaches)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # a rank tearing gloo down while another still talks to it can abort ("terminate called
        # without an active exception"; seen once in 7 runs of the 3-rank test)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
