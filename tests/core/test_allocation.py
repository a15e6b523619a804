"""FT / STA / ISTA allocation (paper 001) and the masked per-task reductions."""
import math

import pytest
import torch
import torch.nn.functional as F

from mtl_plugins.core.allocation import (TaskAllocator, combine_task_losses, masked_task_mean,
                                         pooled_task_mean)
from mtl_plugins.core.tasks import MTLConfigError

TASKS = ("seg", "depth", "normal")


def test_ft_allocates_every_available_task():
    avail = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    alloc = TaskAllocator(TASKS, mode="ft")
    assert alloc.start_batch(avail) == 1
    assert torch.equal(alloc.next_mask(), avail)
    assert alloc.wants_batch


@pytest.mark.parametrize("k", [1, 2])
def test_sta_allocates_k_available_tasks_per_sample(k):
    torch.manual_seed(0)
    avail = torch.rand(64, 3) > 0.3
    alloc = TaskAllocator(TASKS, mode="sta", k=k, seed=1)
    assert alloc.start_batch(avail) == 1
    mask = alloc.next_mask()
    assert not (mask & ~avail).any(), "a task the sample lacks was allocated"
    assert torch.equal(mask.sum(1), avail.sum(1).clamp(max=k))


def test_sta_with_k_equal_T_is_ft():
    avail = torch.rand(16, 3) > 0.2
    sta = TaskAllocator(TASKS, mode="sta", k=3, seed=0).plan(avail)
    ft = TaskAllocator(TASKS, mode="ft").plan(avail)
    assert torch.equal(sta, ft)


def test_sta_k1_is_uniform_over_tasks():
    alloc = TaskAllocator(("a", "b"), mode="sta", k=1, seed=3)
    counts = torch.zeros(2)
    for _ in range(200):
        counts += alloc.plan(50)[0].sum(0).float()
    frac = counts / counts.sum()
    assert abs(frac[0] - 0.5) < 0.02  # 10000 draws: std 0.005


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ista_trains_every_sample_task_pair_exactly_once(k):
    avail = torch.ones(32, 3, dtype=torch.bool)
    avail[0, 1] = False
    avail[1] = torch.tensor([False, False, True])
    alloc = TaskAllocator(TASKS, mode="ista", k=k, seed=2)
    steps = alloc.start_batch(avail)
    assert steps == math.ceil(3 / k)
    masks = [alloc.next_mask() for _ in range(steps)]
    assert alloc.wants_batch
    total = torch.stack(masks).int().sum(0)
    assert torch.equal(total, avail.int())
    for m in masks:
        assert (m.sum(1) <= k).all()
    # the first sub-step is an STA draw: every sample with tasks trains min(k, |tasks|)
    assert torch.equal(masks[0].sum(1), avail.sum(1).clamp(max=k))


def test_ista_requires_finishing_a_batch_and_resumes_mid_batch():
    alloc = TaskAllocator(TASKS, mode="ista", k=1, seed=5)
    alloc.start_batch(8)
    first = alloc.next_mask()
    with pytest.raises(RuntimeError, match="step"):
        alloc.start_batch(8)
    state = alloc.state_dict()
    rest = [alloc.next_mask(), alloc.next_mask()]
    alloc.start_batch(8)
    next_plan = alloc._plans[1]

    restored = TaskAllocator(TASKS, mode="ista", k=1, seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored.next_mask(), rest[0])
    assert torch.equal(restored.next_mask(), rest[1])
    restored.start_batch(8)
    assert torch.equal(restored._plans[1], next_plan)
    restored.discard_batch()
    assert torch.equal(first | rest[0] | rest[1], torch.ones(8, 3, dtype=torch.bool))
    # a batch that cannot be replayed (resumed mid-batch) is discarded, then a new one starts
    restored.start_batch(8)
    restored.next_mask()
    restored.discard_batch()
    assert restored.wants_batch and restored.start_batch(8) == 3


def test_state_mismatch_and_bad_config_name_the_key():
    with pytest.raises(MTLConfigError, match=r"allocation.mode='stx'"):
        TaskAllocator(TASKS, mode="stx")
    with pytest.raises(MTLConfigError, match=r"allocation.k=4.*\[1, 3\]"):
        TaskAllocator(TASKS, mode="sta", k=4)
    state = TaskAllocator(TASKS, mode="sta").state_dict()
    with pytest.raises(MTLConfigError, match="allocation.mode"):
        TaskAllocator(TASKS, mode="ista").load_state_dict(state)
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        TaskAllocator(TASKS).plan(torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(MTLConfigError, match="unique"):
        TaskAllocator(("seg", "seg"))


def test_masked_mean_and_empty_allocation_give_zero_with_graph():
    x = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    m = torch.tensor([True, False, True])
    assert masked_task_mean(x, m).item() == pytest.approx(3.5)
    empty = masked_task_mean(x, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(x.grad, torch.zeros(3))


def test_pooled_mean_equals_ignore_index_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 6)
    labels = torch.randint(0, 5, (4, 6, 6))
    labels[0, :2] = 255
    alloc = torch.tensor([True, False, True, True])
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    valid = labels != 255
    pooled = pooled_task_mean(per_pixel.sum((1, 2)), valid.sum((1, 2)), alloc)
    masked_labels = labels.clone()
    masked_labels[~alloc] = 255
    reference = F.cross_entropy(logits, masked_labels, ignore_index=255)
    assert pooled.item() == pytest.approx(reference.item(), rel=1e-6)
    none = pooled_task_mean(per_pixel.sum((1, 2)), valid.sum((1, 2)), torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0


def test_k_equal_T_reproduces_ft_loss_and_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(10, 5)
    avail = torch.ones(10, 3, dtype=torch.bool)

    def objective(mask):
        per_sample = (x @ w.T) ** 2  # [B, T]
        losses = {t: masked_task_mean(per_sample[:, i], mask[:, i]) for i, t in enumerate(TASKS)}
        return combine_task_losses(losses, 3)

    ft = objective(TaskAllocator(TASKS, "ft").plan(avail)[0])
    g_ft, = torch.autograd.grad(ft, w)
    sta = objective(TaskAllocator(TASKS, "sta", k=3).plan(avail)[0])
    g_sta, = torch.autograd.grad(sta, w)
    plain = ((x @ w.T) ** 2).mean(0).sum()
    assert torch.allclose(ft, plain) and torch.allclose(sta, plain)
    assert torch.allclose(g_ft, g_sta)


def test_combine_task_losses_reductions():
    losses = {"seg": torch.tensor(2.0), "depth": torch.tensor(4.0)}
    assert combine_task_losses(losses, 3, "sum").item() == 6.0
    assert combine_task_losses(losses, 3, "mean").item() == 2.0
    with pytest.raises(MTLConfigError, match="task_reduction='avg'"):
        combine_task_losses(losses, 3, "avg")


def _plans(alloc, batches, size=6):
    out = []
    for _ in range(batches):
        alloc.start_batch(size)
        steps = alloc._plans[alloc.batches - 1].shape[0]
        out.append(torch.stack([alloc.next_mask() for _ in range(steps)]))
    return out


@pytest.mark.parametrize("mode", ["sta", "ista"])
def test_every_rank_resumes_its_own_stream_from_rank_0s_checkpoint(mode):
    """Issue 10 (defect 2): checkpoints are written by rank 0 and loaded by every rank; each
    rank must go on drawing its own allocations (N + resume + N == 2N on every rank)."""
    ranks = [TaskAllocator(TASKS, mode=mode, seed=3, rank=r) for r in range(2)]
    uninterrupted = [_plans(a, 4) for a in ranks]
    assert not all(torch.equal(x, y) for x, y in zip(*uninterrupted)), "ranks draw alike"
    first = [TaskAllocator(TASKS, mode=mode, seed=3, rank=r) for r in range(2)]
    halves = [_plans(a, 2) for a in first]
    saved = first[0].state_dict()  # rank 0 writes the checkpoint
    for r in range(2):
        resumed = TaskAllocator(TASKS, mode=mode, seed=3, rank=r)
        resumed.load_state_dict(saved)
        plans = halves[r] + _plans(resumed, 2)
        assert all(torch.equal(x, y) for x, y in zip(plans, uninterrupted[r])), r


def test_old_checkpoint_without_the_batch_counter_is_refused():
    state = TaskAllocator(TASKS, mode="sta").state_dict()
    del state["batches"]
    with pytest.raises(MTLConfigError, match="batch counter"):
        TaskAllocator(TASKS, mode="sta").load_state_dict(state)


# --------------------------------------------------------------------------- gap (Table 7)
def _run_steps(alloc, n, avail_of):
    """``n`` optimizer steps: ``[(batch index, mask)]``, drawing batches when due."""
    out = []
    for _ in range(n):
        if alloc.wants_batch:
            alloc.start_batch(avail_of(alloc.batches))
        out.append(alloc.next_step())
    return out


def _partial(index, size=6):
    g = torch.Generator().manual_seed(100 + index)
    avail = torch.rand(size, 3, generator=g) > 0.3
    avail[0] = True  # every batch has a sample with all three tasks
    return avail


@pytest.mark.parametrize("k", [1, 2])
def test_gap_1_is_ista_step_for_step(k):
    ista = _run_steps(TaskAllocator(TASKS, mode="ista", k=k, seed=4), 40, _partial)
    gap1 = _run_steps(TaskAllocator(TASKS, mode="gap", k=k, gap=1, seed=4), 40, _partial)
    assert [b for b, _ in ista] == [b for b, _ in gap1]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(ista, gap1))


@pytest.mark.parametrize("gap", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("k", [1, 2])
def test_gap_trains_every_pair_exactly_once_per_batch(gap, k):
    alloc = TaskAllocator(TASKS, mode="gap", k=k, gap=gap, seed=7)
    steps = _run_steps(alloc, 6 * gap * 3, _partial)
    alloc.close_block()  # finish the last block: every drawn batch complete
    while alloc._queue:
        steps.append(alloc.next_step())
    total = {}
    for b, mask in steps:
        total[b] = total.get(b, torch.zeros(6, 3, dtype=torch.int)) + mask.int()
        assert (mask.sum(1) <= k).all()
    assert sorted(total) == list(range(alloc.batches))
    for b, count in total.items():
        assert torch.equal(count, _partial(b).int()), b
    assert alloc.held_batches == []


@pytest.mark.parametrize("gap", [2, 4, 8, 16])
def test_gap_replays_each_batch_gap_steps_later_in_the_papers_order(gap):
    """Paper 001, Table 7: "at step t, a batch ... is trained ... with {ST_i}. At step
    t + gap, the same batch ... is learned again with another allocation": two tasks, k = 1:
    blocks of ``gap`` new batches, then the same batches again in the same order."""
    alloc = TaskAllocator(("seg", "depth"), mode="gap", k=1, gap=gap, seed=1)
    steps = _run_steps(alloc, 6 * gap, lambda b: 4)
    order = [b for b, _ in steps]
    expected = []
    for block in range(3):
        expected += list(range(block * gap, (block + 1) * gap)) * 2
    assert order == expected
    for t, (b, mask) in enumerate(steps):
        if t % (2 * gap) < gap:  # first visit: the second one is gap steps later,
            b2, mask2 = steps[t + gap]  # with the complement (the remaining task)
            assert b2 == b and torch.equal(mask2, ~mask)
            assert mask.sum(1).eq(1).all()


def test_gap_agreed_sub_steps_pad_with_empty_masks_and_blocks_close():
    alloc = TaskAllocator(TASKS, mode="gap", k=1, gap=2, seed=0)
    assert alloc.start_batch(torch.tensor([[True, False, False]]), agree=lambda n: 3) == 3
    b, first = alloc.next_step()
    assert b == 0 and first.sum() == 1 and alloc.wants_batch
    alloc.close_block()  # end of an epoch: the held batch's replays are due now
    assert not alloc.wants_batch
    assert [m.sum().item() for _, m in (alloc.next_step(), alloc.next_step())] == [0, 0]
    assert alloc.wants_batch and alloc.held_batches == []
    with pytest.raises(ValueError, match="agree"):
        alloc.start_batch(2, agree=lambda n: n - 1)


def test_gap_state_resumes_the_block_and_held_batches_are_dropped_without_data():
    from mtl_plugins.core.allocation import HeldBatches

    full = _run_steps(TaskAllocator(TASKS, mode="gap", k=1, gap=4, seed=2), 30, _partial)
    first = TaskAllocator(TASKS, mode="gap", k=1, gap=4, seed=2)
    head = _run_steps(first, 13, _partial)  # inside the second block (12 steps a block)
    state = first.state_dict()
    assert state["gap"] == 4 and [b for b, _ in state["plan"]] == [4]
    resumed = TaskAllocator(TASKS, mode="gap", k=1, gap=4, seed=2)
    resumed.load_state_dict(state)
    tail = _run_steps(resumed, 17, _partial)
    assert [b for b, _ in head + tail] == [b for b, _ in full]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(head + tail, full))
    # adapters hold no data after a resume: the held batch is dropped, a new block starts
    again = TaskAllocator(TASKS, mode="gap", k=1, gap=4, seed=2)
    again.load_state_dict(state)
    held = HeldBatches(again)
    assert held.drop_lost() and again.held_batches == [] and again.wants_batch
    held.add("batch 5", _partial(5))
    assert held.next_step()[0] == "batch 5" and again.batches == 6


def test_gap_config_errors_name_the_key():
    with pytest.raises(MTLConfigError, match=r"allocation.gap=0: expected an integer >= 1"):
        TaskAllocator(TASKS, mode="gap", gap=0)
    with pytest.raises(MTLConfigError, match=r"allocation.gap='2'"):
        TaskAllocator(TASKS, mode="gap", gap="2")
    with pytest.raises(MTLConfigError, match=r"allocation.gap=2 with allocation mode 'ista'"):
        TaskAllocator(TASKS, mode="ista", gap=2)
    state = TaskAllocator(TASKS, mode="gap", gap=2).state_dict()
    with pytest.raises(MTLConfigError, match="allocation.gap: checkpoint has 2"):
        TaskAllocator(TASKS, mode="gap", gap=4).load_state_dict(state)


def test_state_written_before_the_gap_mode_loads():
    """The pre-gap state (one ISTA plan and the position inside it) resumes its batch."""
    alloc = TaskAllocator(TASKS, mode="ista", k=1, seed=5)
    alloc.start_batch(4)
    alloc.next_step()
    plan = alloc._plans[0]
    old = {"mode": "ista", "k": 1, "seed": 5, "batches": 1, "plan": plan.clone(),
           "position": 1}
    restored = TaskAllocator(TASKS, mode="ista", k=1, seed=5)
    restored.load_state_dict(old)
    assert restored.held_batches == [0] and not restored.wants_batch
    assert all(torch.equal(restored.next_step()[1], plan[s]) for s in (1, 2))
    assert restored.wants_batch


def test_steps_per_batch_counts_the_sub_steps_of_ista_and_gap():
    from mtl_plugins.core.allocation import steps_per_batch
    assert [steps_per_batch(m, 3, 1) for m in ("ft", "sta", "ista", "gap")] == [1, 1, 3, 3]
    assert steps_per_batch("gap", 3, 2) == steps_per_batch("ista", 3, 2) == 2
