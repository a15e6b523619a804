"""GradSplit variants of paper 000: DropGrad (Table 4), separate per-task optimizers (§4.1),
the relation read from a file (the JSON of tools/gradsplit_relations.py)."""
import json

import pytest
import torch
from torch import nn

from mtl_plugins.core.backward import TaskBackward
from mtl_plugins.core.structure import (GradSplit, SeparateTaskOptimizers, load_relation,
                                        split_layout, step_task_optimizers)
from mtl_plugins.core.structure.from_config import check_gradsplit_cfg, structure_aggregator
from mtl_plugins.core.tasks import MTLConfigError

TASKS = ("a", "b")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 4, 1), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def losses(self, seed: int, tasks=TASKS):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, generator=g)
        z = self.trunk(x).mean(dim=(2, 3))
        return {t: ((h(z).squeeze(1) - y[:, i]) ** 2).mean()
                for i, (t, h) in enumerate(self.heads.items()) if t in tasks}


# --------------------------------------------------------------------------- DropGrad
def test_dropgrad_equals_hand_drawn_bernoulli_masks_and_resumes():
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.*", TASKS, shared)  # both convs: weight + bias each
    agg = GradSplit(None, layout, drop_rate=0.5, seed=7)
    assert not agg.deterministic
    numel = sum(p.numel() for p in shared)
    grads = torch.randn(2, numel, generator=torch.Generator().manual_seed(1))
    # by hand: one [C, T] mask per conv per step, keep iff U >= p, U from a CPU generator
    gen = torch.Generator().manual_seed(7)
    want_steps = []
    for _ in range(2):
        keep = {m: (torch.rand(4, 2, generator=gen) >= 0.5).float()
                for m in ("trunk.0", "trunk.2")}
        want = grads.sum(0).clone()
        for e in layout.entries:
            block = grads[:, e.offset:e.offset + e.numel].view(2, 4, -1)
            w = keep[e.module]
            want[e.offset:e.offset + e.numel] = (
                w[:, 0:1] * block[0] + w[:, 1:2] * block[1]).reshape(-1)
        want_steps.append(want)
    state = agg.state_dict()
    first = agg(grads)
    torch.testing.assert_close(first, want_steps[0])
    second = agg(grads)
    torch.testing.assert_close(second, want_steps[1])
    assert not torch.equal(first, second)  # redrawn every step
    # the masks are the same for a filter's weight and bias (one draw per conv)
    fresh = GradSplit(None, layout, drop_rate=0.5, seed=123)
    fresh.load_state_dict(state)  # RNG state travels with the checkpoint
    torch.testing.assert_close(fresh(grads), want_steps[0])
    # p = 0 keeps everything: the plain sum
    torch.testing.assert_close(GradSplit(None, layout, drop_rate=0.0)(grads), grads.sum(0))


def test_dropgrad_through_the_engine_drops_whole_task_gradients_per_filter():
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.2", TASKS, shared)
    agg = GradSplit(None, layout, drop_rate=0.75, seed=3)
    losses = net.losses(0)
    per = [torch.autograd.grad(losses[t], shared, retain_graph=True) for t in TASKS]
    TaskBackward(TASKS, agg)(losses, shared, {t: list(h.parameters())
                                             for t, h in net.heads.items()})
    keep = (torch.rand(4, 2, generator=torch.Generator().manual_seed(3)) >= 0.75).float()
    w = shared[2].grad
    for c in range(4):
        torch.testing.assert_close(w[c], keep[c, 0] * per[0][2][c] + keep[c, 1] * per[1][2][c])
    torch.testing.assert_close(shared[0].grad, per[0][0] + per[1][0])  # unsplit conv


def test_dropgrad_errors_name_the_value():
    net = Net()
    layout = split_layout(net, "trunk.2", TASKS, list(net.trunk.parameters()))
    with pytest.raises(MTLConfigError, match=r"drop_rate=1.0: expected a number in \[0, 1\)"):
        GradSplit(None, layout, drop_rate=1.0)
    with pytest.raises(MTLConfigError, match="expected relation=None"):
        GradSplit([[1, 0], [0, 1]], layout, drop_rate=0.5)
    with pytest.raises(MTLConfigError, match=r"mtl.gradsplit.drop_rate=-0.1"):
        check_gradsplit_cfg(dict(modules=["x"], drop_rate=-0.1), TASKS, "mtl.gradsplit")
    with pytest.raises(MTLConfigError, match=r"MTL.GRADSPLIT.RELATION with "
                                             r"MTL.GRADSPLIT.DROP_RATE=0.5"):
        check_gradsplit_cfg(dict(modules=["x"], relation=[[1, 1], [1, 1]], drop_rate=0.5),
                            TASKS, "MTL.GRADSPLIT", upper=True)


# --------------------------------------------------------------------------- separate optimizers
def _masked_task_grads(net, shared, layout, rel, seed, tasks=TASKS):
    """By hand: task t's gradient with the split conv's rows masked by rel[group(c), t]."""
    losses = net.losses(seed, tasks)
    heads = {t: list(net.heads[t].parameters()) for t in tasks}
    out = {}
    for t in tasks:
        g = torch.autograd.grad(losses[t], shared + heads[t], retain_graph=True)
        g = [x.clone() for x in g]
        e = layout.entries[0]
        k = [id(p) for p in shared].index(id(e.param))
        col = TASKS.index(t)
        mask = torch.tensor([1.0 if grp < 0 else rel[grp][col] for grp in e.group.tolist()])
        g[k] = g[k] * mask.view(-1, 1, 1, 1)
        kb = [id(p) for p in shared].index(id(net.trunk[2].bias))
        g[kb] = g[kb] * mask
        out[t] = g
    return out


def test_separate_adam_per_task_equals_one_adam_per_task_on_its_own_gradient(tmp_path):
    rel = [[1, 0], [1, 1]]  # group a ignores b's loss; group b takes both
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.2", TASKS, shared)
    agg = GradSplit(rel, layout, record_task_rows=True)
    engine = TaskBackward(TASKS, agg)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    # the reference: one Adam per task, each over its own copy of (shared + own head), fed
    # that task's masked gradient; the model moves by the sum of the task updates
    ref = Net()
    ref_shared = list(ref.trunk.parameters())
    copies = {t: [p.detach().clone().requires_grad_() for p in ref_shared
                  + list(ref.heads[t].parameters())] for t in TASKS}
    ref_opts = {t: torch.optim.Adam(copies[t], lr=0.01) for t in TASKS}
    schedule = [TASKS, ("a",), ("b",), TASKS]  # mixed and round-robin single-task steps
    for step, present in enumerate(schedule):
        if step == 2:  # checkpoint/resume of the per-task states in the optimizer's own dict
            saved = opt.state_dict()
            opt = torch.optim.Adam(net.parameters(), lr=0.01)
            opt.load_state_dict(saved)
        want = _masked_task_grads(ref, ref_shared, split_layout(ref, "trunk.2", TASKS,
                                                                ref_shared), rel, step, present)
        ref_params = {t: ref_shared + list(ref.heads[t].parameters()) for t in TASKS}
        delta = [torch.zeros_like(p) for p in ref.parameters()]
        index = {id(p): i for i, p in enumerate(ref.parameters())}
        for t in present:
            for c, p in zip(copies[t], ref_params[t]):
                c.data.copy_(p.data)
            for c, g in zip(copies[t], want[t]):
                c.grad = g
            ref_opts[t].step()
            for c, p in zip(copies[t], ref_params[t]):
                delta[index[id(p)]] += c.data - p.data
        with torch.no_grad():
            for p, d in zip(ref.parameters(), delta):
                p += d
        # the plugin: engine (GradSplit records per-task rows) + per-task steps
        opt.zero_grad(set_to_none=True)
        losses = net.losses(step, present)
        heads = {t: list(h.parameters()) for t, h in net.heads.items()}
        engine(losses, shared, heads)
        assert step_task_optimizers(opt, agg, losses, shared, heads)
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # each task's moments saw only its own gradient: b's state of a's head is empty,
    # the shared conv has two states with their own step counts
    w = net.trunk[2].weight
    sa = SeparateTaskOptimizers.task_state(opt, w, "a")
    sb = SeparateTaskOptimizers.task_state(opt, w, "b")
    assert float(sa["step"]) == 3 and float(sb["step"]) == 3
    assert SeparateTaskOptimizers.task_state(opt, net.heads["a"].weight, "b") == {}
    torch.testing.assert_close(sa["exp_avg"], ref_opts["a"].state[copies["a"][2]]["exp_avg"])


def test_first_adam_moment_is_the_tasks_own_masked_gradient():
    """Hand computation after one step: m_t = (1 - β1) g_t, v_t = (1 - β2) g_t² per task."""
    rel = [[1, 0], [0, 1]]
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.2", TASKS, shared)
    agg = GradSplit(rel, layout, record_task_rows=True)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.9, 0.99))
    want = _masked_task_grads(net, shared, layout, rel, 0)
    losses = net.losses(0)
    heads = {t: list(h.parameters()) for t, h in net.heads.items()}
    TaskBackward(TASKS, agg)(losses, shared, heads)
    step_task_optimizers(opt, agg, losses, shared, heads)
    for t in TASKS:
        s = SeparateTaskOptimizers.task_state(opt, net.trunk[2].weight, t)
        torch.testing.assert_close(s["exp_avg"], 0.1 * want[t][2])
        torch.testing.assert_close(s["exp_avg_sq"], 0.01 * want[t][2] ** 2)
    # group a's filters (channels 0-1) never saw b's gradient: b's moments are zero there
    sb = SeparateTaskOptimizers.task_state(opt, net.trunk[2].weight, "b")
    assert torch.count_nonzero(sb["exp_avg"][:2]) == 0


def test_separate_optimizers_config_and_errors():
    net = Net()
    shared = list(net.trunk.parameters())
    cfg = check_gradsplit_cfg(dict(modules=["trunk.2"], separate_optimizers=True), TASKS,
                              "optim_wrapper.mtl.gradsplit")
    agg = structure_aggregator(net, shared, TASKS, None, gradsplit=cfg)
    assert isinstance(agg, GradSplit) and agg.record_task_rows
    with pytest.raises(MTLConfigError, match=r"gradsplit.separate_optimizers='yes'"):
        check_gradsplit_cfg(dict(modules=["x"], separate_optimizers="yes"), TASKS,
                            "optim_wrapper.mtl.gradsplit")
    from mtl_plugins.core.aggregation import PCGrad
    with pytest.raises(MTLConfigError, match="mtl.gradsplit: record_task_rows=True "
                                             r"\(separate optimizers\) with base PCGrad"):
        structure_aggregator(net, shared, TASKS, PCGrad(), gradsplit=cfg, key="mtl")
    # without separate optimizers the adapters step as usual
    plain = structure_aggregator(net, shared, TASKS, None, gradsplit=dict(modules=["trunk.2"]))
    assert not step_task_optimizers(torch.optim.SGD(net.parameters(), lr=0.1), plain,
                                    {}, shared, {})


# --------------------------------------------------------------------------- relation file
def test_relation_from_the_tools_json_and_from_results(tmp_path):
    tasks = ["attr", "reid", "pose"]
    out = tmp_path / "rel.json"
    # the file lists the tasks in another order: rows/columns follow the model's order
    out.write_text(json.dumps({"tasks": ["pose", "attr", "reid"], "tau": -0.01,
                               "relation": [[1, 0, 0], [1, 1, 0], [1, 0, 1]]}))
    rel = load_relation(str(out), tasks)
    # attr ignores reid's loss, reid ignores attr's, pose takes everything
    assert rel.tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 1]]
    res = tmp_path / "results.json"
    res.write_text(json.dumps({
        "single": {"attr": 78.0, "reid": 81.1, "pose": 88.2},
        "pairwise": {"attr,reid": {"attr": 76.0, "reid": 79.0},
                     "attr,pose": {"attr": 78.5, "pose": 86.0},
                     "reid,pose": {"reid": 81.0, "pose": 87.0}}}))
    assert load_relation(res, tasks).tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 1]]
    cfg = check_gradsplit_cfg(dict(modules=["m"], relation=str(out)), tasks,
                              "optim_wrapper.mtl.gradsplit")
    assert cfg["relation"] == [[1, 0, 1], [0, 1, 1], [0, 0, 1]]


def test_relation_file_errors_name_key_value_and_expectation(tmp_path):
    tasks = ["attr", "reid", "pose"]
    key = "optim_wrapper.mtl.gradsplit.relation"
    missing = str(tmp_path / "nope.json")
    with pytest.raises(MTLConfigError, match=rf"{key}='{missing}': no such file; expected"):
        check_gradsplit_cfg(dict(modules=["m"], relation=missing), tasks,
                            "optim_wrapper.mtl.gradsplit")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"tasks": ["attr", "reid", "parsing"],
                                 "relation": [[1, 0, 1], [0, 1, 1], [0, 0, 1]]}))
    with pytest.raises(MTLConfigError, match=r"tasks \['attr', 'reid', 'parsing'\] are not "
                                             r"the model's tasks \['attr', 'reid', 'pose'\]"):
        load_relation(str(wrong), tasks, key)
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"tasks": tasks, "relation": [[1, 0], [0, 1]]}))
    with pytest.raises(MTLConfigError, match=r"shape \(2, 2\); expected \(3, 3\)"):
        load_relation(str(shape), tasks, key)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"matrix": []}))
    with pytest.raises(MTLConfigError, match="expected 'tasks' and 'relation'"):
        load_relation(str(other), tasks, key)
    with pytest.raises(MTLConfigError, match=r"relation: shape \(2, 2\); expected \(3, 3\)"):
        check_gradsplit_cfg(dict(modules=["m"], relation=[[1, 0], [0, 1]]), tasks,
                            "optim_wrapper.mtl.gradsplit")
