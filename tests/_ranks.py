"""Two-process gloo runs for the distributed tests.

Each rank saves its result atomically; the ranks meet at a barrier before tearing the process
group down, so neither closes its sockets while the other still talks to it. Gloo can still abort
a process *after* its work is saved (``terminate called without an active exception`` in its
transport threads at exit: it failed one CI run and recurred once in a full local run): each rank leaves with
``os._exit(0)`` once its result is saved, and an abort that still happens is tolerated only when
every rank's result file is complete, and the test then checks those results as usual.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextmanager
def process_group(rank: int, world: int, init_file: str) -> Iterator[None]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()  # only on success: a rank that raised must not wait for the others
    finally:
        dist.destroy_process_group()
    # Leave without running the interpreter's and C++ static destructors, where gloo's threads can
    # abort the process; reached only on success (an exception skips it and reaches mp.spawn).
    os._exit(0)


def save_result(obj: object, out_dir: str, rank: int) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written result."""
    path = Path(out_dir) / f"rank{rank}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def spawn_ranks(worker: Callable[..., None], world: int, out_dir: Path, *args: object) -> None:
    """Run ``worker(rank, world, init_file, out_dir, *args)`` on ``world`` processes; each rank saves
    its result with ``save_result`` into ``out_dir``, where this checks for them after an abort."""
    try:
        mp.spawn(worker, args=(world, str(out_dir / "init"), str(out_dir), *args), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        saved = all((out_dir / f"rank{r}.pt").exists() for r in range(world))
        if e.signal_name is None or not saved:
            raise
        warnings.warn(f"rank {e.error_index} died of {e.signal_name} after saving its result (gloo teardown)")
