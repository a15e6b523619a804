"""Parameter level without G (issue 12): on a CPU with the C kernel, in a single process, an
aggregator whose direction is ``weights(G G^T) @ G`` gets the Gramian and ``w @ G`` from the
task gradients as autograd made them (``TaskBackward._task_rows_level``), with no ``[T, P]``
matrix filled or held.

The step must be the one the G path gives (the BLAS Gramian keeps G): the same Gramian to
1e-13 and the same ``.grad`` to float32 rounding, over steps that move the aggregators'
state, with absent tasks, learned loss weights, a loss scaler and sparse gradients; G must
not be held; and every case the path does not cover must keep G (an aggregator whose
``forward`` does more than ``weights @ G`` or has forward hooks, GradVac with its own
layers, batched VJPs, another kernel named).
"""
import copy
import os
import shutil

import pytest
import torch
from torch import nn

from mtl_plugins.core.aggregation import build_aggregator
from mtl_plugins.core.aggregation.base import GramianWeighting
from mtl_plugins.core.amp import DynamicLossScaler
from mtl_plugins.core.backward import TaskBackward, split_parameters

from ._engine_models import (TASKS, Recorder, SumRows, TinyMTL, assert_same_steps, batch,
                             engine_step, task_losses)

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="the C kernel needs a C compiler")

#: every aggregator whose direction is weights @ G (GradVac: per layer), with settings that
#: reach its options
WEIGHTINGS = [("pcgrad", {}), ("mgda", {}), ("mgda", {"normalization": "loss"}),
              ("nashmtl", {"max_norm": 0.5}), ("mean", {}), ("sum", {}), ("upgrad", {}),
              ("cagrad", {}), ("aligned_mtl", {}), ("imtl", {}), ("dualproj", {}),
              ("gradvac", {"beta": 0.5, "seed": 3})]  # (GradVac: per-layer weights)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtl_cache"))


def _paths(make, steps=2, drop=(), model=TinyMTL, **engine_kwargs):
    """``{kernel: (engine, [engine_step(...)])}`` for the C kernel's task rows ("auto") and
    the BLAS Gramian's G, each with a fresh ``make()`` and model, on one batch."""
    x, y = batch()
    out = {}
    for kernel in ("auto", "blas"):
        engine = TaskBackward(TASKS, make(), gramian_kernel=kernel, **engine_kwargs)
        m = model()
        out[kernel] = (engine, [engine_step(m, engine, x, y, drop=drop) for _ in range(steps)])
    return out


@pytest.mark.parametrize("name,kwargs", WEIGHTINGS,
                         ids=[n + ("-" + "-".join(k) if k else "") for n, k in WEIGHTINGS])
def test_task_rows_give_the_step_of_g(name, kwargs):
    """Two steps (Nash-MTL's and PCGrad's state move), the same as with G; G is not held."""
    paths = _paths(lambda: build_aggregator(name, **kwargs))
    engine, steps = paths["auto"]
    assert_same_steps(steps, paths["blas"][1], rows=True)
    assert engine._buffer is None and engine.aggregations == 2
    assert paths["blas"][0]._buffer is not None  # (the reference did fill G)


def test_grad_is_the_direction_written_into_the_first_tasks_own_tensors():
    """``.grad`` of the shared parameters: the aggregator's own result on the rows (a twin
    with the same state, on the G a Recorder saw), in tensors of their own (no view of a
    buffer), and the heads keep their task's gradient."""
    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, build_aggregator("pcgrad", seed=4))
    shared, heads = split_parameters(model.encoder, model.heads)
    for _ in range(2):
        twin = copy.deepcopy(engine.aggregator)
        rec = Recorder()
        engine_step(model, TaskBackward(TASKS, rec), x, y)
        z, out = model(x)
        engine(task_losses(out, y), shared, heads)
        expected = twin(rec.seen)
        got = torch.cat([p.grad.reshape(-1) for p in shared])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        assert all(p.grad._base is None and p.grad.shape == p.shape for p in shared)
        assert len({p.grad.data_ptr() for p in shared}) == len(shared)
        reference = {t: torch.autograd.grad(l, heads[t]) for t, l in
                     task_losses(model(x)[1], y).items()}
        for t in TASKS:
            for p, g in zip(heads[t], reference[t]):
                torch.testing.assert_close(p.grad, g)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["nashmtl", "pcgrad"])
def test_an_absent_task_is_left_out_or_a_zero_row(name):
    """Nash-MTL keeps a row per model task (a zero row for the absent one, ``needs_all_tasks``);
    PCGrad aggregates the present ones: both as with G."""
    paths = _paths(lambda: build_aggregator(name), steps=3, drop=(TASKS[1],))
    assert_same_steps(paths["auto"][1], paths["blas"][1], rows=True)
    result = paths["auto"][1][0][0]
    assert result.tasks == (list(TASKS) if name == "nashmtl" else [TASKS[0], TASKS[2]])


def test_learned_loss_weights_and_a_loss_scaler_as_with_g():
    """Extra parameters (learned loss weights) get the summed loss's gradient, the rows are
    unscaled before the Gramian, and an overflow skips the step on this path too."""
    class Weighted(TinyMTL):
        def __init__(self):
            super().__init__()
            self.log_vars = nn.Parameter(torch.zeros(len(TASKS)))

    x, y = batch()
    grads = {}
    for kernel in ("auto", "blas"):
        model = Weighted()
        scaler = DynamicLossScaler(init_scale=1024.0)
        engine = TaskBackward(TASKS, build_aggregator("upgrad"), loss_scaler=scaler,
                              gramian_kernel=kernel)
        shared, heads = split_parameters(model.encoder, model.heads)
        z, out = model(x)
        losses = {t: l * torch.exp(-model.log_vars[i])
                  for i, (t, l) in enumerate(task_losses(out, y).items())}
        result = engine(losses, shared, heads, extra_params=[model.log_vars])
        assert not result.found_inf and result.loss_scale == 1024.0
        grads[kernel] = (result.gramian, {n: p.grad.clone() for n, p in model.named_parameters()})
        assert (engine._buffer is None) == (kernel == "auto")
        z, out = model(x)
        model.zero_grad(set_to_none=True)
        losses = task_losses(out, y)
        losses["depth"] = losses["depth"] * float("inf")
        assert engine(losses, shared, heads).found_inf and scaler.scale == 512.0
        assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(grads["auto"][0], grads["blas"][0], rtol=1e-13, atol=0)
    for n, g in grads["blas"][1].items():
        torch.testing.assert_close(grads["auto"][1][n], g, rtol=1e-6, atol=1e-9)


class SparseTrunk(nn.Module):
    """A shared embedding with sparse gradients in front of TinyMTL's encoder and heads."""

    def __init__(self):
        super().__init__()
        base = TinyMTL()
        self.embed = nn.Embedding(10, 6, sparse=True)
        self.encoder = nn.Sequential(self.embed, nn.Flatten(0, 0), *base.encoder)
        self.heads = base.heads

    def forward(self, x):
        z = self.encoder((x.abs() * 3).long().clamp(max=9)[:, 0])
        return z, {t: h(z).squeeze(1) for t, h in self.heads.items()}


def test_a_sparse_gradient_is_made_dense_as_g_adds_it():
    paths = _paths(lambda: build_aggregator("mgda"), model=SparseTrunk)
    assert_same_steps(paths["auto"][1], paths["blas"][1], rows=True)
    assert paths["auto"][0]._buffer is None
    assert not paths["auto"][1][0][1]["embed.weight"].is_sparse


class Doubled(GramianWeighting):
    """A forward that does more than ``weights @ G``: the engine must call it."""

    def weights(self, gramian):
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)

    def forward(self, grads, gramian=None, out=None):
        return 2 * super().forward(grads, gramian)


@pytest.mark.parametrize("case", ["forward overridden", "gradvac with its own layers",
                                  "batched", "fused", "non-contiguous parameter"])
def test_what_the_task_rows_do_not_cover_keeps_g(case):
    make, kwargs, model = SumRows, {}, TinyMTL
    if case == "forward overridden":
        make = Doubled
    elif case == "gradvac with its own layers":  # (blocks other than the parameters)
        make = lambda: build_aggregator("gradvac", group_sizes=[112, 136])  # noqa: E731
    elif case == "batched":
        kwargs = {"vjp": "batched"}
    elif case == "fused":
        kwargs = {"gramian_kernel": "fused"}
    x, y = batch()
    m = model()
    if case == "non-contiguous parameter":
        m.encoder[2].weight = nn.Parameter(m.encoder[2].weight.detach().t().contiguous().t())
        assert not m.encoder[2].weight.is_contiguous()
    engine = TaskBackward(TASKS, make(), **kwargs)
    _, grads = engine_step(m, engine, x, y)
    assert engine._buffer is not None
    doubled = case == "forward overridden"
    plain = {n: g * (2 if doubled and n.startswith("encoder.") else 1) for n, g in
             engine_step(m, TaskBackward(TASKS), x, y)[1].items()}
    if case.startswith("gradvac"):  # (its step is not the sum: test_task_rows_give_...)
        return
    for n, g in plain.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7)


class Hooked(TinyMTL):
    """A shared scale used through a view whose hook keeps the gradient (the scale's
    ``.grad`` then shares its memory), and a post-accumulate-grad hook that gives the
    first weight's ``.grad`` a transposed layout on every other task (read by address as
    they are, the rows would pair different elements)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.encoder.append(Scale(self.scale, self))
        self.kept = []
        calls = []  # every other call: the rows' elements in different orders

        def transpose(q):
            calls.append(1)
            if len(calls) % 2:
                q.grad = q.grad.t().contiguous().t()

        self.encoder[0].weight.register_post_accumulate_grad_hook(transpose)


class Scale(nn.Module):
    def __init__(self, scale, owner):
        super().__init__()
        self.scale, self.owner = scale, [owner]

    def forward(self, z):
        s = self.scale.view(2, 4)
        s.register_hook(lambda g: self.owner[0].kept.append((g, g.clone())) or None)
        return z * s.reshape(1, 8)


def test_gradients_of_another_layout_or_kept_by_a_hook_give_the_step_of_g():
    """The task rows copy a ``.grad`` of another layout (the C kernel reads by address); a
    gradient a hook kept is read as it is and, as ``GradScaler.unscale_`` or
    ``clip_grad_norm_`` would, may be written into (the first task's: the direction)."""
    x, y = batch()
    steps = {}
    for kernel in ("auto", "blas"):
        engine = TaskBackward(TASKS, build_aggregator("upgrad"), gramian_kernel=kernel)
        m = Hooked()
        steps[kernel] = [engine_step(m, engine, x, y)]
        assert len(m.kept) == len(TASKS) and (engine._buffer is None) == (kernel == "auto")
        assert all(torch.equal(g, value) for g, value in m.kept[1:])  # rows only read
    assert_same_steps(steps["auto"], steps["blas"], rows=True)


def test_a_parameter_listed_twice_counts_once():
    """As on G (one ``.grad`` per parameter): the task rows must not read it as two segments
    nor write the direction into it twice."""
    x, y = batch()
    grads = {}
    for kernel, twice in (("auto", True), ("auto", False), ("blas", True)):
        m = TinyMTL()
        shared, heads = split_parameters(m.encoder, m.heads)
        engine = TaskBackward(TASKS, build_aggregator("pcgrad"), gramian_kernel=kernel)
        z, out = m(x)
        result = engine(task_losses(out, y), shared + shared[:2] if twice else shared, heads)
        grads[kernel, twice] = (result, {n: p.grad.clone() for n, p in m.named_parameters()})
    assert_same_steps([grads["auto", True]], [grads["auto", False]], rows=True)
    assert_same_steps([grads["auto", True]], [grads["blas", True]], rows=True)


def test_a_gradvac_subclass_that_overrides_forward_keeps_g():
    from mtl_plugins.core.aggregation import GradVac

    class Halved(GradVac):
        def forward(self, grads, group_sizes=None, out=None, block_gramians=None):
            return 0.5 * super().forward(grads, group_sizes, None, block_gramians)

    assert not Halved.block_weights_give_direction and GradVac.block_weights_give_direction
    m = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, Halved())
    engine_step(m, engine, x, y)
    assert engine._buffer is not None


@pytest.mark.parametrize("kernel", ["auto", "blas"])
def test_a_backward_that_raises_leaves_no_shared_grad(kernel):
    """An error in the second task's pass (here a hook's) propagates and leaves every shared
    ``.grad`` None on both paths: no task's gradient passes for the step's."""
    m = TinyMTL()
    x, y = batch()
    calls = []

    def fail_second(g):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("hook failed")
        return g

    m.encoder[0].weight.register_hook(fail_second)
    shared, heads = split_parameters(m.encoder, m.heads)
    engine = TaskBackward(TASKS, build_aggregator("pcgrad"), gramian_kernel=kernel)
    z, out = m(x)
    with pytest.raises(RuntimeError, match="hook failed"):
        engine(task_losses(out, y), shared, heads)
    assert all(p.grad is None for p in shared)


class EmptyParameter(nn.Module):
    """A shared parameter with no element (a zero-width layer), reached by every task."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(0))

    def forward(self, z):
        return z + self.p.sum()


@pytest.mark.parametrize("name", ["gradvac", "pcgrad"])
def test_an_empty_shared_parameter_gives_the_step_of_g(name):
    """An empty parameter is an empty segment on the task rows and an empty column block
    on G (GradVac: an empty layer, with its own EMA targets on both paths, that changes
    nothing); before, GradVac's G path refused the engine's block sizes."""
    def model():
        m = TinyMTL()
        m.encoder.insert(2, EmptyParameter())
        return m

    paths = _paths(lambda: build_aggregator(name, **({"seed": 3} if name == "gradvac" else {})),
                   model=model)
    assert paths["auto"][0]._buffer is None and paths["blas"][0]._buffer is not None
    assert_same_steps(paths["auto"][1], paths["blas"][1], rows=True)
    assert all(step[1]["encoder.2.p"].shape == (0,) for _, steps in paths.values()
               for step in steps)
    if name == "gradvac":
        targets = [engine.aggregator.targets for engine, _ in paths.values()]
        assert targets[0].shape == (5, len(TASKS), len(TASKS))
        torch.testing.assert_close(targets[0], targets[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scope", ["module", "global"])
def test_an_aggregator_with_forward_hooks_keeps_g_and_runs_them(scope):
    """The task rows call ``weights``, not ``forward``: with a forward hook on the
    aggregator (its own or a global one), the engine keeps G so that the hook runs, once
    per step, and sees G."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, GramianWeighting):
            seen.append(tuple(args[0].shape))

    agg = build_aggregator("pcgrad")
    handle = (agg.register_forward_hook(hook) if scope == "module"
              else nn.modules.module.register_module_forward_hook(hook))
    try:
        engine = TaskBackward(TASKS, agg)
        x, y = batch()
        engine_step(TinyMTL(), engine, x, y)
    finally:
        handle.remove()
    assert engine._buffer is not None and len(seen) == 1 and seen[0][0] == len(TASKS)
    engine_step(TinyMTL(), engine, x, y)  # the hook removed: back to the task rows
    assert engine._buffer is None
