"""GradSplit (paper 000): masked filter-group gradients, relation estimation."""
import json
import math

import pytest
import torch
from torch import nn

from mtl_plugins.core.aggregation import Mean
from mtl_plugins.core.backward import TaskBackward
from mtl_plugins.core.structure import (GradSplit, GradSplitHook, channel_groups,
                                        relations_from_results, split_layout)
from mtl_plugins.core.tasks import MTLConfigError

TASKS = ("attr", "reid", "pose")
# rows: receiving group t, columns: source loss t' (the Table-1 sub-matrix for 3 tasks)
REL = torch.tensor([[1., 0., 1.], [0., 1., 1.], [0., 0., 1.]])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(6, 7, 3, padding=1, bias=True), nn.GroupNorm(1, 7),
                                   nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(7, 1) for t in TASKS})

    def losses(self, x, y):
        z = self.trunk(x).mean(dim=(2, 3))
        return {t: ((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, (t, h) in
                enumerate(self.heads.items())}


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 2, 5, 5, generator=g), torch.randn(4, 3, generator=g)


def task_grads(net, params, tasks=TASKS):
    x, y = data()
    losses = net.losses(x, y)
    return [torch.autograd.grad(losses[t], params, retain_graph=True) for t in tasks]


def expected_masked(layout, rel, grads_per_task, params):
    """Hand-built: split channels get Σ_t' rel[group(c), t'] g_t'[c]; the rest the sum."""
    ext = torch.cat([rel, torch.ones(1, rel.shape[1])])
    split = {id(e.param): e for e in layout.entries}
    out = []
    for k, p in enumerate(params):
        gs = [g[k] for g in grads_per_task]
        if id(p) in split:
            m = ext[split[id(p)].group]  # [C, T]
            shape = (-1,) + (1,) * (p.dim() - 1)
            out.append(sum(m[:, s].view(shape) * gs[s] for s in range(len(gs))))
        else:
            out.append(sum(gs))
    return out


def run_engine(net, agg, present=TASKS):
    x, y = data()
    losses = {t: v for t, v in net.losses(x, y).items() if t in present}
    shared = list(net.trunk.parameters())
    engine = TaskBackward(TASKS, agg)
    engine(losses, shared, {t: list(h.parameters()) for t, h in net.heads.items()})
    return [p.grad.clone() for p in shared]


@pytest.mark.parametrize("norm", [False, True])
def test_engine_equals_hand_masked_G(norm):
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, ["trunk.2"], TASKS, shared, split_norm_affine=norm)
    assert len(layout.entries) == (4 if norm else 2)
    assert layout.entries[0].group.tolist() == [0, 0, 1, 1, 2, 2, -1]  # 7 = 3*2 + 1 shared
    got = run_engine(net, GradSplit(REL, layout))
    want = expected_masked(layout, REL, task_grads(net, shared), shared)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_excluded_task_gives_exact_zero_and_included_unchanged():
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.2", TASKS, shared)
    # only "attr" has a loss: group reid (row 1) and pose (row 2) exclude it
    got = run_engine(net, GradSplit(REL, layout), present=("attr",))
    g_attr = task_grads(net, shared, ("attr",))[0]
    w, b = got[2], got[3]
    for c in range(7):
        allowed = c in (0, 1, 6)  # attr group and the shared remainder channel
        if allowed:
            assert torch.equal(w[c], g_attr[2][c]) and torch.equal(b[c], g_attr[3][c])
        else:
            assert torch.count_nonzero(w[c]) == 0 and b[c] == 0
    for k in (0, 1):  # unsplit layer: unchanged
        assert torch.equal(got[k], g_attr[k])


def test_identity_relation_gives_per_task_groups():
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.2", TASKS, shared, remainder="last")
    assert layout.entries[0].group.tolist() == [0, 0, 1, 1, 2, 2, 2]
    got = run_engine(net, GradSplit(None, layout))
    per = task_grads(net, shared)
    for c in range(7):
        t = min(c // 2, 2)
        torch.testing.assert_close(got[2][c], per[t][2][c])


def test_all_ones_relation_is_plain_sum():
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.*", TASKS, shared)  # both convs by pattern
    assert [e.name for e in layout.entries] == ["trunk.0.weight", "trunk.0.bias",
                                                "trunk.2.weight", "trunk.2.bias"]
    got = run_engine(net, GradSplit(torch.ones(3, 3), layout))
    x, y = data()
    net.zero_grad(set_to_none=True)
    sum(net.losses(x, y).values()).backward()
    for g, p in zip(got, shared):
        torch.testing.assert_close(g, p.grad)


def test_base_aggregator_sees_only_unsplit_columns():
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.2", TASKS, shared)
    got = run_engine(net, GradSplit(REL, layout, base=Mean()))
    per = task_grads(net, shared)
    want = expected_masked(layout, REL, per, shared)
    torch.testing.assert_close(got[0], want[0] / 3)  # mean on the rest
    torch.testing.assert_close(got[2], want[2])       # eq. 4 sum on the split part


@pytest.mark.parametrize("mode", ["after", "hooks"])
def test_hook_for_single_task_batches(mode):
    net = Net()
    shared = list(net.trunk.parameters())
    layout = split_layout(net, "trunk.2", TASKS, shared, split_norm_affine=True)
    hook = GradSplitHook(REL, layout)
    x, y = data()
    x.requires_grad_(True)
    ref = torch.autograd.grad(net.losses(x, y)["attr"], [x] + shared)
    loss = net.losses(x, y)["attr"]
    if mode == "after":
        loss.backward()
        hook.mask_grads_("attr")
    else:
        with hook.source_task("attr"):
            loss.backward()
    want = expected_masked(layout, REL, [ref[1:], [torch.zeros_like(p) for p in shared],
                                         [torch.zeros_like(p) for p in shared]], shared)
    for p, w in zip(shared, want):
        assert torch.equal(p.grad, w)
    assert torch.equal(x.grad, ref[0])  # input gradient unchanged
    assert len(shared[2]._backward_hooks or {}) == 0  # hooks removed


def _table(change):
    """single = 100 each; pair results give acc_t^{t,t'} = 100 * (1 + change[(t', t)])."""
    single = {t: 100.0 for t in ("attr", "reid", "pose", "parsing")}
    pairwise = {}
    names = list(single)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairwise[f"{a},{b}"] = {a: 100.0 * (1 + change.get((b, a), 0.0)),
                                    b: 100.0 * (1 + change.get((a, b), 0.0))}
    return single, pairwise


def test_relations_reproduce_table1():
    # Table 1: Attr hurts ReID/Pose/Parsing, ReID hurts Attr/Pose/Parsing (drops > 1%);
    # small drops (-0.5%) and gains are tolerated
    change = {("attr", "reid"): -0.05, ("attr", "pose"): -0.02, ("attr", "parsing"): -0.011,
              ("reid", "attr"): -0.03, ("reid", "pose"): -0.04, ("reid", "parsing"): -0.02,
              ("pose", "attr"): 0.01, ("pose", "reid"): -0.005, ("parsing", "reid"): 0.02,
              ("parsing", "pose"): -0.009}
    single, pairwise = _table(change)
    rel = relations_from_results(single, pairwise)
    assert rel.tolist() == [[1, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert relations_from_results(single, pairwise, tau=math.inf).tolist() == \
        torch.eye(4).tolist()
    # lower-is-better: an increase of the error is a drop
    pw = dict(pairwise)
    pw["attr,reid"] = {"attr": 100.0, "reid": 90.0}
    rel2 = relations_from_results(single, pw, lower_is_better=["reid"])
    assert rel2[1, 0] == 1  # reid error fell by 10%: attr helps reid
    with pytest.raises(MTLConfigError, match="attr"):
        relations_from_results(single, {k: v for k, v in pairwise.items() if k != "attr,reid"})


def test_relations_tool(tmp_path, capsys):
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "gsr", pathlib.Path(__file__).parents[2] / "tools" / "gradsplit_relations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    single, pairwise = _table({("attr", "reid"): -0.05})
    path = tmp_path / "res.json"
    path.write_text(json.dumps({"single": single, "pairwise": pairwise}))
    out = tmp_path / "rel.json"
    mod.main([str(path), "--out", str(out)])
    text = capsys.readouterr().out
    assert "reid" in text
    saved = json.loads(out.read_text())
    assert saved["relation"][1][0] == 0 and saved["tasks"][:2] == ["attr", "reid"]


def test_errors_name_key_and_value():
    net = Net()
    shared = list(net.trunk.parameters())
    with pytest.raises(MTLConfigError, match="trunk.9"):
        split_layout(net, ["trunk.9"], TASKS, shared)
    with pytest.raises(MTLConfigError, match="trunk.3.*GroupNorm"):
        split_layout(net, ["trunk.3"], TASKS, shared)
    with pytest.raises(MTLConfigError, match="not in shared_params"):
        split_layout(net, ["trunk.2"], TASKS, shared[:2])
    with pytest.raises(MTLConfigError, match="at least one channel"):
        channel_groups(2, 3)
    layout = split_layout(net, ["trunk.2"], TASKS, shared)
    with pytest.raises(MTLConfigError, match="diagonal"):
        GradSplit(torch.zeros(3, 3), layout)
    with pytest.raises(MTLConfigError, match=r"expected \(3, 3\)"):
        GradSplit(torch.ones(2, 2), layout)


class NormConv(nn.Conv2d):
    """A detectron2-style conv that owns its norm (``conv.norm``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.norm = nn.GroupNorm(2, self.out_channels)

    def forward(self, x):
        return self.norm(super().forward(x))


def test_controller_and_owned_norm():
    from mtl_plugins.core.controller import MTLController
    torch.manual_seed(0)
    trunk = nn.Sequential(NormConv(2, 6, 3, padding=1, bias=False), nn.ReLU())
    heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})
    shared = list(trunk.parameters())
    layout = split_layout(trunk, ["0"], TASKS, shared, split_norm_affine=True)
    assert [e.name for e in layout.entries] == ["0.weight", "0.norm.weight", "0.norm.bias"]
    ctrl = MTLController(TASKS, aggregator=GradSplit(REL, layout))
    assert "aggregator.relation" in ctrl.state_dict()
    x, y = data()
    z = trunk(x).mean(dim=(2, 3))
    losses = {t: ((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, (t, h) in
              enumerate(heads.items())}
    per = [torch.autograd.grad(losses[t], shared, retain_graph=True) for t in TASKS]
    ctrl.backward(losses, shared, {t: list(h.parameters()) for t, h in heads.items()})
    for p, w in zip(shared, expected_masked(layout, REL, per, shared)):
        torch.testing.assert_close(p.grad, w)
