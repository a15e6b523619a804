"""Maximum Roaming (paper 002): masks, roaming updates, per-task forward, state."""
import io

import pytest
import torch
from torch import nn

from mtl_plugins.core.backward import TaskBackward
from mtl_plugins.core.structure import MaximumRoaming, RoamingMask
from mtl_plugins.core.structure.roaming import optimizer_steps_per_epoch
from mtl_plugins.core.tasks import MTLConfigError

TASKS = ("seg", "depth", "normal")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 20, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(20)
        self.heads = nn.ModuleDict({t: nn.Conv2d(20, 1, 1) for t in TASKS})

    def trunk(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def make(p=0.6, **kw):
    net = Net()
    return net, MaximumRoaming(net, ["bn1", "bn2"], TASKS, p=p, **kw)


def test_exact_count_kept_and_coverage_at_init():
    net, mr = make(p=0.6)
    for m, c in zip(mr.masks, (10, 20)):
        assert m.n_active == round(0.6 * c)
        assert m.mask.sum(1).tolist() == [m.n_active] * 3
        assert bool(m.mask.any(0).all())  # every channel used by some task (eq. 3)
        assert torch.equal(m.visited, m.mask)
        # masks differ between tasks (random cover + random fill)
        assert not torch.equal(m.mask[0], m.mask[1]) and not torch.equal(m.mask[1], m.mask[2])


def test_count_constant_and_all_visited_after_expected_updates():
    net, mr = make(p=0.6, interval=2)
    assert mr.updates_to_finish() == 20 - 12
    swaps = 0
    for step in range(1, 2 * 8 + 1):
        swaps += mr.step()
        for m in mr.masks:
            assert m.mask.sum(1).tolist() == [m.n_active] * 3
            assert bool((m.visited | ~m.mask).all())  # active ⊆ visited
        if step == 2 * 4:  # bn1 (10 channels, 6 active) done after 4 updates
            assert bool(mr.masks[0].visited.all()) and not bool(mr.masks[1].visited.all())
    assert bool(mr.masks[1].visited.all()) and mr.finished
    assert swaps == 3 * (4 + 8)
    frozen = [m.mask.clone() for m in mr.masks]
    assert mr.update_masks() == 0  # plan over: masks frozen
    assert all(torch.equal(a, m.mask) for a, m in zip(frozen, mr.masks))


def test_completion_rate_stops_early():
    net, mr = make(p=0.6, completion=0.5)
    for _ in range(20):
        mr.update_masks()
    assert mr.masks[1].swaps.tolist() == [4, 4, 4] and mr.masks[0].swaps.tolist() == [2, 2, 2]


def test_forward_applies_task_mask_and_gradients():
    net, mr = make(p=0.5)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="no active task"):
        net.trunk(x)
    feats = mr.forward_per_task(lambda t: net.trunk(x))
    for i, t in enumerate(TASKS):
        off = ~mr.masks[1].mask[i]
        assert torch.count_nonzero(feats[t][:, off]) == 0
    # engine: task t never trains the conv2 filters outside its mask
    losses = mr.forward_per_task(lambda t: net.heads[t](net.trunk(x)).pow(2).mean())
    shared = [p for n, p in net.named_parameters() if not n.startswith("heads")]
    eng = TaskBackward(TASKS, None)
    per = {t: torch.autograd.grad(losses[t], [net.conv2.weight], retain_graph=True)[0]
           for t in TASKS}
    for i, t in enumerate(TASKS):
        off = ~mr.masks[1].mask[i]
        assert torch.count_nonzero(per[t][off]) == 0
    eng(losses, shared, {t: list(h.parameters()) for t, h in net.heads.items()})
    torch.testing.assert_close(net.conv2.weight.grad, sum(per.values()))
    with mr.disabled():
        assert net.trunk(x).shape == (2, 20, 4, 4)


def test_state_round_trip_reproduces_next_update():
    net, mr = make(p=0.6, seed=5, interval=1)
    for _ in range(3):
        mr.step()
    buf = io.BytesIO()
    torch.save(mr.state_dict(), buf)
    mr.update_masks()
    a = [m.mask.clone() for m in mr.masks]
    net2, mr2 = make(p=0.6, seed=99, interval=1)
    buf.seek(0)
    mr2.load_state_dict(torch.load(buf, weights_only=True))
    assert int(mr2.num_updates) == 3
    mr2.update_masks()
    assert all(torch.equal(x, m.mask) for x, m in zip(a, mr2.masks))
    # a state saved for other layers is refused, naming them
    other = MaximumRoaming(Net(), ["bn2"], TASKS, p=0.6)
    state = {k: v for k, v in mr.state_dict().items() if not k.startswith("masks.")}
    state.update({k.replace("masks.1.", "masks.0."): v for k, v in mr.state_dict().items()
                  if k.startswith("masks.1.")})
    with pytest.raises(MTLConfigError, match=r"layers \['bn1', 'bn2'\]"):
        other.load_state_dict(state)


def test_bernoulli_init_covers_and_keeps_counts():
    m = RoamingMask(64, 3, 0.5, init="bernoulli", generator=torch.Generator().manual_seed(1))
    assert bool(m.mask.any(0).all())
    counts = m.mask.sum(1).clone()
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        m.update(g)
        assert torch.equal(m.mask.sum(1), counts)


@pytest.mark.parametrize("p", [0, -0.1, 1.5, "0.5", True])
def test_bad_p(p):
    with pytest.raises(MTLConfigError, match=r"p=.*sharing ratio"):
        make(p=p)


def test_bad_layer_names_and_args():
    net = Net()
    with pytest.raises(MTLConfigError, match="unknown module name 'bn3'"):
        MaximumRoaming(net, ["bn1", "bn3"], TASKS, p=0.5)
    with pytest.raises(MTLConfigError, match="layer_names: pattern 'layer9.*'"):
        MaximumRoaming(net, ["layer9.*"], TASKS, p=0.5)
    with pytest.raises(MTLConfigError, match="interval=0"):
        MaximumRoaming(net, ["bn1"], TASKS, p=0.5, interval=0)
    with pytest.raises(MTLConfigError, match="init='x'"):
        MaximumRoaming(net, ["bn1"], TASKS, p=0.5, init="x")
    mr = MaximumRoaming(net, ["bn*"], TASKS, p=0.5)
    assert mr.layer_names == ["bn1", "bn2"]
    with pytest.raises(MTLConfigError, match="task='x'"):
        mr.set_task("x")


@pytest.mark.parametrize("seed", range(5))
def test_bernoulli_full_roaming_finishes_only_when_every_task_visited_every_channel(seed):
    # paper 002 eq. 6: r = 100% means B_t = all channels for every task; with the Bernoulli
    # init the tasks start with different counts, so the plan is per task (C − |A_t(0)|)
    net = Net()
    mr = MaximumRoaming(net, ["bn1", "bn2"], TASKS, p=0.5, init="bernoulli", seed=seed,
                        interval=1)
    start = [m.mask.sum(1).clone() for m in mr.masks]
    assert any(len(set(s.tolist())) > 1 for s in start)  # unequal per-task counts
    assert mr.updates_to_finish() == max(int((m.channels - s).max())
                                         for m, s in zip(mr.masks, start))
    for _ in range(100):
        if mr.finished:
            break
        mr.update_masks()
    assert mr.finished
    for m, s in zip(mr.masks, start):
        assert bool(m.visited.all()), "finished while a task still has never-used channels"
        assert torch.equal(m.mask.sum(1), s)  # each task's count is kept (Lemma 1.3)


def test_bernoulli_partial_completion_is_per_task():
    net = Net()
    mr = MaximumRoaming(net, ["bn2"], TASKS, p=0.5, init="bernoulli", seed=3, completion=0.5)
    unvisited = (~mr.masks[0].visited).sum(1)
    while not mr.finished:
        mr.update_masks()
    assert mr.masks[0].swaps.tolist() == [round(0.5 * int(u)) for u in unvisited]


def test_interval_default_is_the_papers_tenth_of_an_epoch_and_converts_to_steps():
    net, mr = make(p=0.6)  # neither interval nor interval_epochs: the paper's Δ = 0.1 epoch
    assert mr.interval_epochs == 0.1 and mr.interval is None
    with pytest.raises(MTLConfigError, match=r"interval_epochs=0.1: .*steps per epoch"):
        mr.step()  # not converted yet: refused, not a silent no-op
    # 1000 samples, 4 per process, 2 processes, accumulation 1: 125 steps per epoch
    spe = optimizer_steps_per_epoch(1000, 4, world_size=2)
    assert spe == 125.0
    assert mr.set_steps_per_epoch(spe) == 12 and mr.interval == 12  # round(0.1 * 125)
    swaps = [mr.step() for _ in range(24)]
    assert [i + 1 for i, s in enumerate(swaps) if s] == [12, 24]
    assert "interval_steps" not in mr.state_dict()  # derived from config + data on each start
    # Δ in epochs, ISTA's sub-steps and gradient accumulation
    _, mr = make(p=0.6, interval_epochs=0.5)
    assert mr.set_steps_per_epoch(optimizer_steps_per_epoch(
        100, 2, accumulation=5, steps_per_batch=3)) == 15  # 0.5 * 100 / 10 * 3
    assert make(p=0.6, interval_epochs=0.001)[1].set_steps_per_epoch(10.0) == 1  # at least 1
    # explicit steps are kept
    _, mr = make(p=0.6, interval=7)
    assert mr.interval_epochs is None and mr.set_steps_per_epoch(125.0) == 7


def test_interval_both_forms_or_bad_values_refused():
    with pytest.raises(MTLConfigError, match=r"interval=5 and interval_epochs=0.1: expected one"):
        make(interval=5, interval_epochs=0.1)
    for bad in (0, -1.0, float("nan"), "0.1", True):
        with pytest.raises(MTLConfigError, match=r"interval_epochs=.*expected"):
            make(interval_epochs=bad)
    with pytest.raises(MTLConfigError, match=r"steps_per_epoch=0"):
        make()[1].set_steps_per_epoch(0)
    with pytest.raises(MTLConfigError, match=r"batch_size=0"):
        optimizer_steps_per_epoch(10, 0)


def test_masking_a_conv_whose_output_enters_a_norm_is_refused():
    # conv1 → bn1: BN would re-add β to the zeroed channels (and normalise them), so the
    # mask must sit on bn1's output (paper 002 eq. 2, after normalisation)
    net = Net()
    mr = MaximumRoaming(net, ["conv1", "bn2"], TASKS, p=0.5, interval=1)
    with pytest.raises(MTLConfigError, match=r"layer_names: the masked output of 'conv1' goes "
                                             r"straight into the normalisation layer 'bn1' "
                                             r"\(BatchNorm2d\).*expected .*'bn1' instead of "
                                             r"'conv1'"):
        mr.forward_per_task(lambda t: net.trunk(torch.randn(2, 3, 4, 4)))
    # the norms' outputs: accepted, and the check is removed after the first full pass
    net = Net()
    mr = MaximumRoaming(net, ["bn1", "bn2"], TASKS, p=0.5, interval=1)
    feats = mr.forward_per_task(lambda t: net.trunk(torch.randn(2, 3, 4, 4)))
    assert len(feats) == 3 and mr._norm_hooks == {} and mr._norm_check_done
    # the check reaches through the root module's forward too (re-hooked on replaced norms)
    wrapped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    mr = MaximumRoaming(wrapped, ["0"], TASKS, p=0.5, interval=1)
    mr.remove()  # detaches every hook: no mask, no check
    assert wrapped(torch.randn(1, 3, 2, 2)).shape == (1, 8, 2, 2)
    mr = MaximumRoaming(wrapped, ["0"], TASKS, p=0.5, interval=1)
    wrapped[1] = nn.SyncBatchNorm(8)  # replaced after the build (as SyncBN conversion does)
    with pytest.raises(MTLConfigError, match=r"'0' goes straight into .* '1' \(SyncBatchNorm\)"):
        with mr.task("seg"):
            wrapped(torch.randn(1, 3, 2, 2))


def test_is_norm_names_norms_only():
    from mtl_plugins.core.structure.roaming import is_norm

    class FrozenBatchNorm2d(nn.Module):
        pass

    class NormalHead(nn.Module):  # a surface-normal head is no norm
        pass

    assert all(is_norm(m) for m in (nn.BatchNorm2d(2), nn.SyncBatchNorm(2), nn.GroupNorm(1, 2),
                                     nn.LayerNorm(2), nn.InstanceNorm2d(2), FrozenBatchNorm2d()))
    assert not any(is_norm(m) for m in (nn.Conv2d(1, 1, 1), NormalHead(), nn.ReLU()))
