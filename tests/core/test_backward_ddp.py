"""A 2-process gloo run of the engine matches a 1-process run on the union batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtl_plugins.core.backward import TaskBackward, split_parameters

from ._engine_models import TASKS, TinyMTL, UnitSum, batch, task_losses


def _grads(model, x, y, drop=()):
    model.zero_grad(set_to_none=True)
    _, out = model(x)
    losses = {t: l for t, l in task_losses(out, y).items() if t not in drop}
    shared, heads = split_parameters(model.encoder, model.heads)
    result = TaskBackward(TASKS, UnitSum())(losses, shared, heads)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    x, y = batch(n=8)
    half = slice(rank * 4, rank * 4 + 4)
    model = TinyMTL()
    # rank 0 has no depth labels this step: depth is averaged over rank 1 alone
    result, grads = _grads(model, x[half], y[half], drop=("depth",) if rank == 0 else ())
    torch.save({"tasks": result.tasks, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_match_one_rank_on_the_union_batch(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y = batch(n=8)
    model = TinyMTL()
    model.zero_grad(set_to_none=True)
    _, out = model(x)
    losses = task_losses(out, y)
    # union batch, with the depth loss over the samples that have depth (rank 1's half)
    losses["depth"] = ((out["depth"][4:] - y[4:, 1]) ** 2).mean()
    shared, heads = split_parameters(model.encoder, model.heads)
    TaskBackward(TASKS, UnitSum())(losses, shared, heads)
    reference = {n: p.grad for n, p in model.named_parameters()}
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["tasks"] == list(TASKS)
        for name, g in reference.items():
            assert torch.allclose(saved["grads"][name], g, atol=1e-6), (rank, name)
