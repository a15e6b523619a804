"""Recon (paper 004): layer-wise conflict scores and task-specific copies."""
import json

import pytest
import torch
from torch import nn

from mtl_plugins.core.backward import TaskBackward
from mtl_plugins.core.structure import (ConflictRecorder, TaskRouter, load_ranking,
                                        make_task_specific, recon_param_increase,
                                        recon_param_report)
from mtl_plugins.core.tasks import MTLConfigError

TASKS = ("A", "B")


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l0 = nn.Linear(4, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.l0(x))
        return self.a(h), self.b(h)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = Trunk()
        self.heads = nn.ModuleDict({t: nn.Identity() for t in TASKS})

    def losses(self, x, tasks=TASKS):
        out = {}
        for t in tasks:
            a, b = self.trunk(x)
            sign = 1.0 if t == "A" else -1.0  # layer `a`: opposite pulls by construction
            out[t] = sign * a.mean() + (1.0 if t == "A" else 2.0) * (b ** 2).mean()
        return out


def search(model, steps=6, S=-0.02):
    rec = ConflictRecorder(model, ["trunk"], S=S, shared_params=list(model.trunk.parameters()),
                           task_names=TASKS)
    engine = TaskBackward(TASKS, rec)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        model.zero_grad(set_to_none=True)
        engine(model.losses(x), list(model.trunk.parameters()))
        with torch.no_grad():  # plain SGD (torch.optim's first use imports dynamo: slow)
            for p in model.trunk.parameters():
                p -= 0.05 * p.grad
    return rec


def test_constructed_conflict_layer_ranks_first(tmp_path):
    rec = search(Model())
    ranking = rec.ranking()
    assert ranking[0] == ("trunk.a", 6)  # cos = -1 every step, 1 pair per step
    assert dict(ranking)["trunk.b"] == 0  # aligned (cos = +1)
    assert [n for n, _ in ranking] == rec.top(3)
    path = tmp_path / "rank.json"
    rec.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["iterations"] == 6 and data["S"] == -0.02 and data["tasks"] == list(TASKS)
    assert data["ranking"][0] == {"module": "trunk.a", "score": 6, "params": 8 * 3 + 3}
    assert load_ranking(str(path), 1) == ["trunk.a"]


def test_recorder_is_transparent_and_skips_zero_gradients():
    m1, m2 = Model(), Model()
    x = torch.randn(8, 4)
    rec = ConflictRecorder(m1, shared_params=list(m1.trunk.parameters()))
    TaskBackward(TASKS, rec)(m1.losses(x), list(m1.trunk.parameters()))
    sum(m2.losses(x).values()).backward()
    for p, q in zip(m1.trunk.parameters(), m2.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # base = Sum: joint training
    rec.reset()
    # a zero row (absent task) is never a conflict
    G = torch.zeros(2, rec.numel)
    G[0] = 1.0
    assert rec.record(G).sum() == 0
    G[1] = -1.0
    assert rec.record(G).tolist() == [1, 1, 1]


def test_task_specific_copies_get_only_their_task_gradient():
    model = Model()
    before = sum(p.numel() for p in model.parameters())
    a_params = sum(p.numel() for p in model.trunk.a.parameters())
    tr = make_task_specific(model, ["trunk.a"], TASKS)
    assert isinstance(model.trunk.a, TaskRouter)
    assert tr.param_increase == (len(TASKS) - 1) * a_params
    assert sum(p.numel() for p in model.parameters()) == before + tr.param_increase
    assert recon_param_increase(Model(), ["trunk.a"], 3) == 2 * a_params
    # copies start equal (init="copy")
    assert torch.equal(model.trunk.a.copies["A"].weight, model.trunk.a.copies["B"].weight)
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="no active task"):
        model.trunk(x)
    losses = tr.forward_per_task(lambda t: model.losses(x, [t])[t])
    losses["A"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.trunk.a.copies["B"].parameters())
    assert all(p.grad is not None for p in model.trunk.a.copies["A"].parameters())
    # through the engine: copies are task parameters, the rest stays shared
    model.zero_grad(set_to_none=True)
    shared = tr.shared_parameters(model.trunk)
    assert {id(p) for p in shared} == {id(p) for n, p in model.trunk.named_parameters()
                                       if ".copies." not in n}
    TaskBackward(TASKS, ConflictRecorder(model, shared_params=shared))(
        losses, shared, tr.task_params)
    ref = torch.autograd.grad(tr.forward_per_task(lambda t: model.losses(x, [t])[t])["B"],
                              list(model.trunk.a.copies["B"].parameters()))
    for p, r in zip(model.trunk.a.copies["B"].parameters(), ref):
        torch.testing.assert_close(p.grad, r)


def test_reset_init_and_errors():
    model = Model()
    tr = make_task_specific(model, "trunk.b", TASKS, init="reset")
    assert not torch.equal(model.trunk.b.copies["A"].weight, model.trunk.b.copies["B"].weight)
    with pytest.raises(MTLConfigError, match="already task-specific"):
        make_task_specific(model, ["trunk.b"], TASKS)
    with pytest.raises(MTLConfigError, match="inside 'trunk'"):
        make_task_specific(Model(), ["trunk", "trunk.a"], TASKS)
    with pytest.raises(MTLConfigError, match="unknown module name 'trunk.z'"):
        make_task_specific(Model(), ["trunk.z"], TASKS)
    with pytest.raises(MTLConfigError, match="S=0.5"):
        ConflictRecorder(Model(), S=0.5)
    with pytest.raises(MTLConfigError, match="'head'"):
        ConflictRecorder(Model(), ["head"])
    assert tr.relative_increase > 0


def test_search_tool_runs(capsys):
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "rs", pathlib.Path(__file__).parents[2] / "tools" / "recon_search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--steps", "2", "--topk", "2", "--batch", "2"])
    out = capsys.readouterr().out
    assert "parameter increase" in out and "rank" in out


def test_shared_context_with_roaming():
    from mtl_plugins.core.structure import MaximumRoaming, TaskContext
    model = Model()
    ctx = TaskContext(TASKS)
    tr = make_task_specific(model, ["trunk.b"], TASKS, context=ctx)
    mr = MaximumRoaming(model, ["trunk.l0"], TASKS, p=0.5, context=ctx)
    x = torch.randn(2, 4)
    outs = tr.forward_per_task(lambda t: model.trunk(x))
    for i, t in enumerate(TASKS):  # both the router and the masks follow the same task
        with ctx.active(t):
            h = torch.tanh(model.trunk.l0(x))
            torch.testing.assert_close(outs[t][1], model.trunk.b.copies[t](h))
        assert mr.masks[0].mask[i].sum() == 4


def test_pretrained_state_dict_loads_into_every_copy():
    """A state dict of the un-converted model (pretrained weights) fills every copy; a copy
    with its own entry keeps it; the un-routed keys are consumed, not unexpected."""
    import copy

    from mtl_plugins.core.structure.recon import (route_pretrained, router_task_parameters,
                                                  unrouted_state_dict)

    pretrained = Model().state_dict()
    model = Model()
    make_task_specific(model, ["trunk.a"], TASKS, init="reset")
    model = copy.deepcopy(model)  # the hook survives a deepcopy (e.g. DDP / EMA copies)
    state = dict(pretrained)
    own = torch.full_like(pretrained["trunk.a.weight"], 7.0)
    state["trunk.a.copies.B.weight"] = own
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.trunk.a.copies["A"].weight, pretrained["trunk.a.weight"])
    assert torch.equal(model.trunk.a.copies["A"].bias, pretrained["trunk.a.bias"])
    assert torch.equal(model.trunk.a.copies["B"].weight, own)
    assert torch.equal(model.trunk.a.copies["B"].bias, pretrained["trunk.a.bias"])
    assert "trunk.a.weight" in state  # the caller's dict is not modified
    # name-matching loaders (detectron2's .pkl) see the un-converted names, then route
    names = unrouted_state_dict(model)
    assert set(names) == set(pretrained)
    routed = route_pretrained(model, dict(pretrained))
    assert set(routed) == set(model.state_dict())
    # the round trip of a converted model's own checkpoint is unchanged
    again = Model()
    make_task_specific(again, ["trunk.a"], TASKS, init="reset")
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.trunk.a.copies["B"].weight, own)
    params = router_task_parameters(model, TASKS)
    assert [p is q for p, q in zip(params["B"], model.trunk.a.copies["B"].parameters())] == [
        True, True]


def test_param_report_gives_model_increase_and_share_of_shared_params():
    """Paper 004 reports both (~l. 193): the model-size increase (Tables 1-5) and the % of
    shared parameters turned task-specific. Hand count: trunk = l0 (4·8+8 = 40) + a (8·3+3 =
    27) + b (27) = 94 shared parameters, the whole model too (identity heads)."""
    model = Model()
    tr = make_task_specific(model, ["trunk.a"], ("A", "B", "C"),
                            shared_params=list(model.trunk.parameters()))
    rep = tr.report
    assert (rep.converted, rep.increase, rep.total, rep.shared) == (27, 54, 94, 94)
    assert rep.model_increase_pct == pytest.approx(100 * 54 / 94)  # 57.45 %
    assert rep.shared_converted_pct == pytest.approx(100 * 27 / 94)  # 28.72 %
    assert tr.param_increase == rep.increase
    assert rep.describe() == ("+54 parameters (+57.45% of the 94 model parameters); 28.72% of "
                              "the 94 shared parameters turned task-specific (27)")
    # without θ_sh: the model increase only; θ_sh smaller than the model (l0 and a shared)
    bare = recon_param_report(Model(), ["trunk.a"], 2)
    assert bare.shared is None and bare.shared_converted_pct is None
    assert "shared" not in bare.describe()
    m = Model()
    part = recon_param_report(m, ["trunk.a"], 2, list(m.trunk.l0.parameters())
                              + list(m.trunk.a.parameters()))
    assert part.shared_converted_pct == pytest.approx(100 * 27 / 67)
    assert part.model_increase_pct == pytest.approx(100 * 27 / 94)
