"""2-process CPU runs of detectron2 training code: detectron2's ``launch`` on gloo.

detectron2 0.6's ``launch`` asserts CUDA and initialises NCCL, and ``create_ddp_model`` gives
DDP ``device_ids=[local_rank]`` (a GPU); neither works on a CPU machine. :func:`launch_cpu`
mirrors what ``launch``'s ``_distributed_worker`` does (the process group, detectron2's
local process group, a first ``comm.synchronize()``) with gloo (data-loader workers are
forked, not spawned, to keep the runs short), and makes
``create_ddp_model`` wrap a CPU model without ``device_ids``. Every run is bounded: a
collective that waits longer than the timeout raises (gloo's own timeout), and a run that
is still going after it fails the test (no hang).
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable, Sequence

import pytest
import torch


def _cpu_create_ddp_model(model, *, fp16_compression=False, **kwargs):
    """``create_ddp_model`` for a CPU model: DDP without ``device_ids``."""
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    if comm.get_world_size() == 1:
        return model
    kwargs.pop("device_ids", None)
    return DistributedDataParallel(model, **kwargs)


def _worker(rank: int, main_func: Callable, world: int, init_file: str, args: Sequence[Any],
            timeout: float) -> None:
    """detectron2's ``_distributed_worker`` with gloo on CPU."""
    import detectron2.engine.defaults as defaults
    import torch.distributed as dist
    from detectron2.utils import comm

    torch.set_num_threads(1)
    # a spawned process makes its data-loader workers by spawning too (each re-imports torch
    # and detectron2: ~10 s on a 2-core machine); forked workers start at once
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout))
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))
    comm.synchronize()
    defaults.create_ddp_model = _cpu_create_ddp_model
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_cpu(main_func: Callable, args: Sequence[Any] = (), world: int = 2,
               timeout: float = 120.0) -> None:
    """Run ``main_func(*args)`` in ``world`` gloo processes (``comm`` set up as ``launch``
    does); fail the test if they are not all done after ``timeout`` seconds."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        context = mp.start_processes(_worker, args=(main_func, world, init, tuple(args),
                                                    timeout), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"{getattr(main_func, '__name__', main_func)}: the {world} "
                            f"processes did not finish within {timeout:.0f}s (a hang)")
