"""Share a sweep between processes started by torchrun: each process (rank) does a disjoint slice of the work.

    python run_longbench.py ...                                              # one process: rank 0 of 1
    python -m torch.distributed.run --standalone --nproc-per-node 2 run_longbench.py ...   # 2 GPUs (= torchrun)

torchrun starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `Shard.from_env()` reads them (rank 0 of 1
without them). How the runners use it:

* every rank builds the same list of work items ((run, sample) pairs) and keeps `shard.take(items)`, the items
  rank, rank + world_size, ...; the slices are disjoint and cover the list whatever is already done, and a rank
  skips the items of its slice that the results file already holds (resume);
* every rank appends to the same JSONL files; utils/runs/records.py locks the file around each append, so records never
  interleave;
* each rank runs on its own GPU, `shard.device("auto")` = cuda:LOCAL_RANK;
* the only collective is a barrier (gloo, no GPU needed; `distributed()` joins the process group): rank 0 loads the
  model and data first (`shard.main_first()`: a first use converts or downloads them into the cache, once), and
  rank 0 prints summaries once every rank has finished (`shard.barrier()`).

A rank that fails ends the run: torchrun stops the other ranks. Rerun the same command to go on (finished items are
skipped, with any number of processes).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

# How long a rank waits at a barrier for the others: rank 0 converting a model on first use (minutes), or the
# slowest rank finishing its slice. A rank that dies does not leave the others waiting: torchrun stops them.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Shard:
    """This process's place among the processes of one run: rank in [0, world_size), GPU index local_rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"rank {self.rank} of {self.world_size} (local rank {self.local_rank}) is not a valid "
                             "process; launch with torchrun --nproc-per-node N, or without torchrun for one process")

    @classmethod
    def from_env(cls, environ=None) -> "Shard":
        """The shard torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK; rank 0 of 1 when they are not set."""
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local_rank = int(environ.get("LOCAL_RANK", rank))
        except (KeyError, ValueError):
            raise ValueError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers; launch with "
                             "torchrun, or unset WORLD_SIZE for one process") from None
        return cls(rank, world_size, local_rank)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints summaries and writes tables."""
        return self.rank == 0

    def take(self, items) -> list:
        """This rank's share of `items` (a list every rank builds in the same order): every world_size-th item
        from position rank."""
        return list(items)[self.rank::self.world_size]

    def label(self, name: str) -> str:
        """A progress-bar title that says which rank it is when there are several."""
        return f"{name} [rank {self.rank}/{self.world_size}]" if self.world_size > 1 else name

    def device(self, requested: str) -> str:
        """The device this rank runs on: `requested` for one process; with several, "auto"/"cuda" become
        cuda:LOCAL_RANK (made the current device, so that kernels launch there too), "auto" without CUDA is
        "cpu", and an explicit cuda:N is refused (every rank would use the same GPU)."""
        if self.world_size == 1 or requested == "cpu":
            return requested
        import torch

        if requested not in ("auto", "cuda"):
            raise ValueError(f"--device {requested} with {self.world_size} processes would put them all on one "
                             "device; pass --device cuda (or auto): each process takes cuda:LOCAL_RANK")
        if not torch.cuda.is_available():
            return "cpu" if requested == "auto" else requested  # load_model says that CUDA is missing
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(f"process {self.local_rank} of this machine has no GPU of its own ({count} visible); "
                             f"launch at most {count} processes per machine (NPROC={count})")
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for with one process)."""
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first, the other ranks after it (then from the cache it filled): loading a model or
        data that a first use converts or downloads."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


@contextlib.contextmanager
def distributed(shard: Shard | None = None):
    """Join the process group of a torchrun launch for the run's barriers (gloo: CPU, works beside any GPU work) and
    leave it at the end; yields the Shard. One process: nothing to join."""
    shard = Shard.from_env() if shard is None else shard
    import torch.distributed as dist

    if shard.world_size == 1 or dist.is_initialized():
        yield shard
        return
    dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world_size, timeout=BARRIER_TIMEOUT)
    try:
        yield shard
    finally:
        dist.destroy_process_group()


__all__ = ["Shard", "distributed", "BARRIER_TIMEOUT"]
