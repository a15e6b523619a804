"""The per-task backward engine: rows of G, task-specific gradients, levels, AMP, errors."""
import pytest
import torch

from mtl_plugins.core.amp import DynamicLossScaler
from mtl_plugins.core.backward import TaskBackward, split_parameters
from mtl_plugins.core.tasks import MTLConfigError

from ._engine_models import (TASKS, Recorder, SumRows, TinyMTL, UnitSum, batch, engine_step,
                             task_losses)


def _plain_grads(model, x, y, tasks=TASKS):
    model.zero_grad(set_to_none=True)
    _, out = model(x)
    losses = task_losses(out, y)
    sum(losses[t] for t in tasks).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_sum_aggregation_equals_plain_backward(level):
    model = TinyMTL()
    x, y = batch()
    reference = _plain_grads(model, x, y)
    result, grads = engine_step(model, TaskBackward(TASKS, SumRows(), level=level), x, y)
    assert result.tasks == list(TASKS) and not result.found_inf
    assert grads.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(grads[name], reference[name], atol=1e-6), name


def test_rows_of_G_are_the_task_gradients_and_heads_get_their_own():
    model = TinyMTL()
    x, y = batch()
    rec = Recorder()
    _, grads = engine_step(model, TaskBackward(TASKS, rec), x, y)
    shared = list(model.encoder.parameters())
    _, out = model(x)
    losses = task_losses(out, y)
    for i, t in enumerate(TASKS):
        g = torch.autograd.grad(losses[t], shared, retain_graph=True)
        assert torch.allclose(rec.seen[i], torch.cat([v.reshape(-1) for v in g]), atol=1e-6)
        h = torch.autograd.grad(losses[t], list(model.heads[t].parameters()), retain_graph=True)
        assert torch.allclose(grads[f"heads.{t}.0.weight"], h[0], atol=1e-6)


def test_nonlinear_aggregate_is_written_to_shared_params():
    model = TinyMTL()
    x, y = batch()
    _, grads = engine_step(model, TaskBackward(TASKS, UnitSum()), x, y)
    shared = list(model.encoder.parameters())
    _, out = model(x)
    losses = task_losses(out, y)
    rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        losses[t], shared, retain_graph=True)]) for t in TASKS])
    expected = UnitSum()(rows)
    got = torch.cat([grads[n].reshape(-1) for n, _ in model.encoder.named_parameters()
                     for n in [f"encoder.{n}"]])
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_absent_task_is_left_out(level):
    model = TinyMTL()
    x, y = batch()
    reference = _plain_grads(model, x, y, tasks=("seg", "normal"))
    result, grads = engine_step(model, TaskBackward(TASKS, SumRows(), level=level), x, y,
                                  drop=("depth",))
    assert result.tasks == ["seg", "normal"]
    assert result.gramian.shape == (2, 2)
    assert not any(n.startswith("heads.depth") for n in grads)
    for name in reference:
        assert torch.allclose(grads[name], reference[name], atol=1e-6)


def test_gramian_gives_cosines():
    model = TinyMTL()
    x, y = batch()
    result, _ = engine_step(model, TaskBackward(TASKS, SumRows()), x, y)
    cos = result.cosines()
    assert torch.allclose(cos.diagonal(), torch.ones(3, dtype=torch.float64))
    assert (cos.abs() <= 1 + 1e-9).all()


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_gramian_is_accumulated_in_float64(level):
    """Issue 11: the engine's Gramian is summed in float64 from the float32 rows (exact
    products), not formed in float32 and cast afterwards."""
    model = TinyMTL()
    x, y = batch()
    rec = Recorder()
    result, _ = engine_step(model, TaskBackward(TASKS, rec, level=level), x, y)
    assert rec.seen.dtype == torch.float32 and result.gramian.dtype == torch.float64
    exact = rec.seen.double() @ rec.seen.double().T
    assert torch.allclose(result.gramian, exact, rtol=1e-14, atol=0)


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_loss_scaling_gives_the_unscaled_gradients(level):
    model = TinyMTL()
    x, y = batch()
    _, reference = engine_step(model, TaskBackward(TASKS, UnitSum(), level=level), x, y)
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=1)
    result, grads = engine_step(model, TaskBackward(TASKS, UnitSum(), level=level,
                                                      loss_scaler=scaler), x, y)
    assert result.loss_scale == 1024.0 and not result.found_inf
    assert scaler.scale == 2048.0  # grew after one finite step (growth_interval=1)
    for name in reference:
        assert torch.allclose(grads[name], reference[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("aggregator", [UnitSum, None])
def test_overflow_skips_the_step_and_backs_off(aggregator):
    model = TinyMTL()
    x, y = batch()
    scaler = DynamicLossScaler(init_scale=1024.0)
    engine = TaskBackward(TASKS, aggregator and aggregator(), loss_scaler=scaler)
    z, out = model(x)
    losses = task_losses(out, y)
    losses["depth"] = losses["depth"] * float("inf")
    shared, heads = split_parameters(model.encoder, model.heads)
    result = engine(losses, shared, heads)
    assert result.found_inf and scaler.scale == 512.0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("level", ["parameter", "representation", "plain"])
def test_finite_gradients_whose_float32_sums_overflow_are_not_skipped(level):
    """The finiteness check sums each head gradient in float32 and confirms a non-finite
    sum in float64: finite entries of 2e38 (their float32 sum overflows) give a step, one
    inf entry among them gives none. ``plain``: no aggregator, under a loss scaler (of 1),
    where every gradient is checked so."""
    model = TinyMTL()
    x, y = batch()
    bias = model.heads["seg"][0].bias  # 8 entries, each gets a gradient of about 2e38
    shared, heads = split_parameters(model.encoder, model.heads)
    for spoil in (False, True):  # an inf entry in the gradient (the loss stays finite)
        model.zero_grad(set_to_none=True)
        z, out = model(x)
        losses = task_losses(out, y)
        losses["seg"] = losses["seg"] + (bias * 2e38).sum()
        hook = bias.register_hook(lambda g: g.index_fill(0, torch.tensor([3]), float("inf"))
                                  if spoil else g)
        engine = TaskBackward(TASKS, None, loss_scaler=DynamicLossScaler(init_scale=1.0)) \
            if level == "plain" else TaskBackward(TASKS, SumRows(), level=level)
        result = engine(losses, shared, heads, features=z)
        hook.remove()
        assert result.found_inf is spoil
        if spoil:
            assert all(p.grad is None for p in model.parameters())
        else:
            assert torch.isfinite(bias.grad).all() and bias.grad.sum() == float("inf")
            assert all(p.grad is not None for p in model.encoder.parameters())


def test_all_finite_confirms_an_overflowing_float32_sum_in_float64():
    """The representation level's check of the shared gradients: the float32 sum of finite
    entries may overflow (confirmed finite in float64); a NaN or an inf entry is caught
    whatever the other entries."""
    from mtl_plugins.core.backward import _all_finite

    big = torch.full((4,), 3e38)
    assert _all_finite([torch.ones(3), big]) and _all_finite([big.double(), big])  # mixed dtypes
    assert _all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = big.clone()
        spoiled[2] = bad
        assert not _all_finite([torch.ones(3), spoiled]), bad
        assert not _all_finite([torch.tensor([1.0, bad], dtype=torch.float16)]), bad


def test_nan_loss_raises_naming_the_task_and_touches_nothing():
    model = TinyMTL()
    x, y = batch()
    _, out = model(x)
    losses = task_losses(out, y)
    losses["normal"] = losses["normal"] * float("nan")
    shared, heads = split_parameters(model.encoder, model.heads)
    with pytest.raises(FloatingPointError, match="'normal'"):
        TaskBackward(TASKS, SumRows())(losses, shared, heads)
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_errors_name_the_key():
    model = TinyMTL()
    x, y = batch()
    _, out = model(x)
    losses = task_losses(out, y)
    shared, heads = split_parameters(model.encoder, model.heads)
    with pytest.raises(MTLConfigError, match=r"losses: unknown task name\(s\) \['edge'\]"):
        TaskBackward(TASKS, SumRows())({"edge": losses["seg"]}, shared, heads)
    with pytest.raises(MTLConfigError, match="task_params"):
        TaskBackward(TASKS, SumRows())(losses, shared, {"seg": list(model.encoder.parameters())})
    with pytest.raises(ValueError, match="no task has a loss"):
        TaskBackward(TASKS, SumRows())({}, shared, heads)
    with pytest.raises(MTLConfigError, match="features"):
        TaskBackward(TASKS, SumRows(), level="representation")(losses, shared, heads)
    with pytest.raises(MTLConfigError, match="level='rep'"):
        TaskBackward(TASKS, SumRows(), level="rep")


def test_extra_params_get_the_summed_loss_gradient():
    model = TinyMTL()
    x, y = batch()
    log_vars = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
    shared, heads = split_parameters(model.encoder, model.heads)
    for level in ("parameter", "representation"):
        log_vars.grad = None
        model.zero_grad(set_to_none=True)
        z, out = model(x)
        raw = task_losses(out, y)
        weighted = {t: torch.exp(-log_vars[i]) * raw[t] + log_vars[i] for i, t in enumerate(TASKS)}
        TaskBackward(TASKS, SumRows(), level=level)(weighted, shared, heads, features=z,
                                                     extra_params=[log_vars])
        expected = torch.tensor([1 - torch.exp(-log_vars[i]).item() * raw[t].item()
                                 for i, t in enumerate(TASKS)])
        assert torch.allclose(log_vars.grad, expected, atol=1e-6), level


def test_plain_path_without_aggregator():
    model = TinyMTL()
    x, y = batch()
    reference = _plain_grads(model, x, y)
    result, grads = engine_step(model, TaskBackward(TASKS, None), x, y)
    assert result.gramian is None
    for name in reference:
        assert torch.allclose(grads[name], reference[name])


def test_existing_grad_is_refused():
    model = TinyMTL()
    x, y = batch()
    _, out = model(x)
    losses = task_losses(out, y)
    shared, heads = split_parameters(model.encoder, model.heads)
    shared[0].grad = torch.zeros_like(shared[0])
    with pytest.raises(RuntimeError, match="set_to_none"):
        TaskBackward(TASKS, SumRows())(losses, shared, heads)


class ProtocolRecorder(Recorder):
    """Declares the aggregator protocol: all-task rows, losses and layer sizes."""

    needs_all_tasks = True
    needs_losses = True

    def forward(self, grads, losses=None, group_sizes=None):
        self.losses, self.group_sizes = losses, group_sizes
        return super().forward(grads)


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_aggregator_protocol_rows_losses_and_groups(level):
    model = TinyMTL()
    x, y = batch()
    rec = ProtocolRecorder()
    z, out = model(x)
    losses = task_losses(out, y)
    del losses["depth"]
    shared, heads = split_parameters(model.encoder, model.heads)
    result = TaskBackward(TASKS, rec, level=level)(losses, shared, heads, features=z)
    assert result.tasks == list(TASKS)
    assert rec.seen.shape[0] == 3 and torch.count_nonzero(rec.seen[1]) == 0
    assert rec.losses.tolist() == pytest.approx([losses["seg"].item(), 0.0, losses["normal"].item()])
    expected_groups = [p.numel() for p in shared] if level == "parameter" else None
    assert rec.group_sizes == expected_groups


def test_stateful_aggregators_run_with_an_absent_task():
    from mtl_plugins.core.aggregation import build_aggregator

    for name in ("gradvac", "nashmtl", dict(type="mgda", normalization="loss+")):
        model = TinyMTL()
        x, y = batch()
        engine = TaskBackward(TASKS, build_aggregator(name))
        for drop in ((), ("depth",), ()):
            _, grads = engine_step(model, engine, x, y, drop=drop)
            assert all(torch.isfinite(g).all() for g in grads.values()), name


def test_batched_vjp_equals_sequential():
    x, y = batch()
    results = {}
    for vjp in ("sequential", "batched"):
        model = TinyMTL()
        log_vars = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
        rec = Recorder()
        z, out = model(x)
        raw = task_losses(out, y)
        losses = {t: torch.exp(-log_vars[i]) * raw[t] for i, t in enumerate(TASKS)}
        del losses["depth"]
        shared, heads = split_parameters(model.encoder, model.heads)
        TaskBackward(TASKS, rec, vjp=vjp)(losses, shared, heads, extra_params=[log_vars])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[vjp] = (rec.seen, grads, log_vars.grad.clone())
    (g1, p1, l1), (g2, p2, l2) = results["sequential"], results["batched"]
    assert torch.allclose(g1, g2, atol=1e-6)
    assert p1.keys() == p2.keys()
    for name in p1:
        assert torch.allclose(p1[name], p2[name], atol=1e-6), name
    assert torch.allclose(l1, l2, atol=1e-6)
    with pytest.raises(MTLConfigError, match="vjp='vmap'"):
        TaskBackward(TASKS, SumRows(), vjp="vmap")


def test_representation_level_aggregates_half_precision_features_in_float32():
    model, recorder = TinyMTL(), Recorder()
    x, y = batch()
    engine = TaskBackward(TASKS, recorder, level="representation",
                          loss_scaler=DynamicLossScaler(init_scale=1024.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, out = model(x)
        losses = task_losses(out, y)
    assert z.dtype == torch.bfloat16
    shared, heads = split_parameters(model.encoder, model.heads)
    result = engine(losses, shared, heads, features=z)
    assert recorder.seen.dtype == torch.float32 and not result.found_inf
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in shared)


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "nashmtl", "mean", "sum", "gradvac",
                                  "upgrad", "cagrad"])
def test_direction_written_into_g_gives_the_aggregators_own_result(name):
    """Parameter level with G (the BLAS Gramian: the C kernel keeps per-task rows instead,
    tests/core/test_task_rows.py): the shared direction is written into row 0 of G, the
    buffer kept across steps (``out=``: no memory beyond G, no fresh P-sized tensor per
    step), and equals the aggregator's own result on the task-gradient rows (a copy of the
    aggregator, same state, called without ``out``)."""
    import copy

    from mtl_plugins.core.aggregation import build_aggregator

    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, build_aggregator(name), gramian_kernel="blas")
    shared = list(model.encoder.parameters())
    pointers = []
    for _ in range(2):
        twin = copy.deepcopy(engine.aggregator)
        rec = Recorder()
        engine_step(model, TaskBackward(TASKS, rec), x, y)  # the rows G of this step
        _, grads = engine_step(model, engine, x, y)
        groups = {"group_sizes": [p.numel() for p in shared]} if name == "gradvac" else {}
        expected = twin(rec.seen, **groups)  # GradVac: the engine passes layer-wise groups
        got = torch.cat([grads[f"encoder.{n}"].reshape(-1)
                         for n, _ in model.encoder.named_parameters()])
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), name
        pointers.append(engine._buffer.data_ptr())
        assert shared[0].grad is None  # engine_step cleared it: G may be reused
    assert pointers[0] == pointers[1]
    assert engine._buffer.shape == (len(TASKS), sum(p.numel() for p in shared))


@pytest.mark.parametrize("name", ["mgda", "nashmtl", "pcgrad", "aligned_mtl", "gradvac"])
def test_the_gramian_is_formed_once_per_step(name, monkeypatch):
    """The engine's float64 Gramian is handed to the aggregator, which does not form it again
    (MGDA and Nash-MTL did: twice the cost of the Gramian per step); GradVac gets the engine's
    per-layer Gramians (their sum is the whole one)."""
    import mtl_plugins.core.aggregation.base as base
    import mtl_plugins.core.aggregation.gradvac as gradvac
    import mtl_plugins.core.aggregation.mgda as mgda
    import mtl_plugins.core.aggregation.nashmtl as nashmtl
    import mtl_plugins.core.aggregation.gramian_kernels as kernels
    from mtl_plugins.core.aggregation import build_aggregator
    from mtl_plugins.core.aggregation._utils import gramian64

    calls = {"engine": 0, "aggregator": 0}

    def counting(who):
        def gram(grads, chunk=None, work=None):
            calls[who] += grads.shape[1]  # columns covered
            return gramian64(grads, chunk, work)
        return gram

    for module in (base, mgda, nashmtl, gradvac):
        monkeypatch.setattr(module, "gramian64", counting("aggregator"))
    monkeypatch.setattr(kernels, "gramian64", counting("engine"))
    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, build_aggregator(name), gramian_kernel="blas")
    columns = sum(p.numel() for p in model.encoder.parameters())
    for step in range(3):
        engine_step(model, engine, x, y)
        assert calls == {"engine": (step + 1) * columns, "aggregator": 0}, (name, calls)


@pytest.mark.parametrize("name,level", [("pcgrad", "parameter"), ("gradvac", "parameter"),
                                        ("pcgrad", "representation")])
def test_the_gramian_scratch_buffer_is_kept_from_step_to_step(name, level):
    """The engine forms the float64 Gramian (whole, or GradVac's per-layer blocks; of the
    parameters or of the representation) in one scratch buffer that it keeps: no allocation
    per step (the Gramian's values are checked by the exactness tests)."""
    from mtl_plugins.core.aggregation import build_aggregator, c_gramian

    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, build_aggregator(name), level=level, gramian_kernel="blas")
    engine_step(model, engine, x, y)
    work = engine._work
    assert work is not None and work.dtype == torch.float64
    for _ in range(2):
        engine_step(model, engine, x, y)
        assert engine._work is work
    engine_step(model, engine, x, y, drop=(TASKS[0],))  # fewer rows: the buffer still fits
    assert engine._work is work
    # the C kernel (the default's choice on a CPU, where it builds) needs no scratch at all
    engine = TaskBackward(TASKS, build_aggregator(name), level=level, gramian_kernel="auto")
    engine_step(model, engine, x, y)
    assert engine._work is None or c_gramian.unavailable()


def test_rows_are_exact_where_a_task_does_not_reach_a_shared_parameter():
    """The sequential rows are written from each task's ``autograd.grad`` into G, which is
    not zeroed first: a shared parameter one task does not reach gets zeros in that task's
    row, on every step (the buffer is reused), and the rows equal ``autograd.grad`` exactly."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 4)
    side = torch.nn.Linear(4, 4)  # shared, but only "a" uses it
    heads = {"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)}
    shared = list(trunk.parameters()) + list(side.parameters())
    rec = Recorder()
    engine = TaskBackward(["a", "b"], rec)
    for step in range(3):
        x = torch.randn(5, 4)
        z = trunk(x)
        losses = {"a": heads["a"](side(z)).pow(2).mean(), "b": heads["b"](z).pow(2).mean()}
        want = [torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                           for g, p in zip(torch.autograd.grad(losses[t], shared,
                                                               retain_graph=True,
                                                               allow_unused=True), shared)])
                for t in ("a", "b")]
        engine(losses, shared, {t: list(h.parameters()) for t, h in heads.items()})
        assert torch.equal(rec.seen[0], want[0]) and torch.equal(rec.seen[1], want[1]), step
        assert torch.count_nonzero(rec.seen[1][-20:]) == 0  # side's 16 + 4 entries in b's row
        for p in shared + [q for h in heads.values() for q in h.parameters()]:
            p.grad = None


def test_the_engine_leaves_no_hook_and_a_plain_backward_after_it_is_plain():
    """The engine puts nothing on the parameters (no post-accumulate-grad hook, no ``.grad``
    of a shared parameter kept from its rows): a plain backward afterwards accumulates
    ``.grad`` exactly as without it."""
    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, Recorder())
    engine_step(model, engine, x, y)
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    reference = _plain_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    _, out = model(x)
    sum(task_losses(out, y).values()).backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, reference[name]), name


def test_a_gradient_hook_on_a_shared_parameter_applies_to_its_rows():
    """A hook registered on a shared parameter (GradSplit's masks: ``register_hook``) shapes
    that parameter's slice of every task's row, as it shapes ``.grad`` in ``.backward()``."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 4)
    heads = {"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)}
    shared = list(trunk.parameters())
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).expand(4, 4)
    trunk.weight.register_hook(lambda g: g * mask)
    rec = Recorder()
    x = torch.randn(5, 4)
    z = trunk(x)
    losses = {t: h(z).pow(2).mean() for t, h in heads.items()}
    want = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared,
                                                                  retain_graph=True)])
            for t in ("a", "b")]
    TaskBackward(["a", "b"], rec)(losses, shared, {t: list(h.parameters())
                                                    for t, h in heads.items()})
    for t in range(2):
        assert torch.equal(rec.seen[t], want[t])
        weight_part = rec.seen[t][:16].view(4, 4)
        assert torch.count_nonzero(weight_part[:, 1::2]) == 0  # masked columns


def test_rows_with_a_sparse_or_an_unreached_shared_gradient_are_written_slice_by_slice():
    """Where a task's shared gradients cannot be concatenated into its row in one go (a
    sparse embedding gradient; a parameter the task does not reach), each slice is written
    on its own: the rows equal ``autograd.grad``'s, densified, zeros where unreached."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 4, sparse=True)
    trunk = torch.nn.Linear(4, 4)
    side = torch.nn.Linear(4, 4)  # shared, reached by "a" only
    heads = {"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)}
    shared = list(emb.parameters()) + list(trunk.parameters()) + list(side.parameters())
    rec = Recorder()
    z = trunk(emb(torch.tensor([0, 2, 3])))
    losses = {"a": heads["a"](side(z)).pow(2).mean(), "b": heads["b"](z).pow(2).mean()}
    want = []
    for t in ("a", "b"):
        gs = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
        want.append(torch.cat([(torch.zeros_like(p) if g is None else
                                g.to_dense() if g.is_sparse else g).reshape(-1)
                               for g, p in zip(gs, shared)]))
    TaskBackward(["a", "b"], rec)(losses, shared, {t: list(h.parameters())
                                                    for t, h in heads.items()})
    for t in range(2):
        assert torch.equal(rec.seen[t], want[t])
        assert torch.count_nonzero(rec.seen[t][4:8]) == 0  # embedding row 1: not looked up
    assert torch.count_nonzero(rec.seen[1][-20:]) == 0  # side's 16 + 4 entries in b's row


def test_task_gradients_accumulate_straight_into_their_row_of_g():
    """Memory is plain + T task gradients: while task t's backward runs, every shared
    parameter's ``.grad`` is a view of G's row t, so each gradient is added there as it is
    computed and freed (no task's gradients are held beside G). A post-accumulate-grad hook
    sees it: ``.grad`` lies inside row t of the engine's buffer, and holds exactly this
    task's gradient of the parameter."""
    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, Recorder())
    shared, heads = split_parameters(model.encoder, model.heads)
    _, out = model(x)
    losses = task_losses(out, y)
    want = {t: torch.autograd.grad(losses[t], shared, retain_graph=True) for t in TASKS}
    seen = []

    def check(p, i=0):
        buf = engine._buffer
        row_bytes = buf.stride(0) * buf.element_size()
        row = (p.grad.data_ptr() - buf.data_ptr()) // row_bytes
        assert 0 <= row < len(TASKS) and p.grad.untyped_storage().data_ptr() == buf.data_ptr()
        seen.append((i, TASKS[row], p.grad.clone()))

    handles = [p.register_post_accumulate_grad_hook(lambda p, i=i: check(p, i))
               for i, p in enumerate(shared)]
    try:
        engine(losses, shared, heads)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(TASKS) * len(shared)
    for i, task, grad in seen:
        assert torch.equal(grad, want[task][i]), (i, task)


def test_kept_grad_views_follow_g_when_the_tasks_change():
    """The shared parameters' ``.grad`` views of G's direction row are kept from step to step
    and made again when G is reallocated (another number of rows): every step's ``.grad``
    is the sum of that step's task gradients, whatever ran before (G's path: the BLAS
    Gramian)."""
    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, SumRows(), gramian_kernel="blas")
    previous = (None, None)  # the last step's G and views
    for drop in ((), (), (TASKS[1],), (), (TASKS[0], TASKS[2]), (TASKS[0], TASKS[2])):
        _, grads = engine_step(model, engine, x, y, drop=drop)
        present = [t for t in TASKS if t not in drop]
        reference = _plain_grads(model, x, y, tasks=present)
        assert set(grads) == set(reference), drop
        for n in reference:
            assert torch.allclose(grads[n], reference[n], atol=1e-6), (drop, n)
        if engine._buffer is previous[0]:
            assert engine._views is previous[1]  # same G, same views: not made again
        else:
            assert engine._views is not previous[1]
        previous = (engine._buffer, engine._views)

    class OutOnEvenCalls(SumRows):  # writes into ``out`` on every other call only
        calls = 0

        def forward(self, grads, gramian=None, out=None):
            self.calls += 1
            return super().forward(grads, gramian=gramian, out=out if self.calls % 2 else None)

    engine = TaskBackward(TASKS, OutOnEvenCalls())  # (forward overridden: G's path)
    reference = _plain_grads(model, x, y)
    for _ in range(4):  # a fresh direction never gets the kept views of G's row
        _, grads = engine_step(model, engine, x, y)
        assert all(torch.allclose(grads[n], reference[n], atol=1e-6) for n in reference)


def test_a_replaced_engine_is_freed():
    """Nothing on the model holds an engine: one that is replaced
    (``MTLController.set_aggregator``) is freed with its G."""
    import gc
    import weakref

    model = TinyMTL()
    x, y = batch()
    engine = TaskBackward(TASKS, Recorder())
    engine_step(model, engine, x, y)
    gone = weakref.ref(engine)
    del engine
    gc.collect()
    assert gone() is None
    _, grads = engine_step(model, TaskBackward(TASKS, SumRows()), x, y)  # a new one works
    reference = _plain_grads(model, x, y)
    assert all(torch.allclose(grads[n], reference[n], atol=1e-6) for n in reference)


@pytest.mark.parametrize("kernel", ["c", "fused"])
def test_bad_or_useless_gramian_kernel_settings_are_refused_naming_the_key(kernel):
    """An unknown kernel, and a named one with no aggregator (the plain summed loss forms no
    Gramian: the setting would do nothing); the default ``"auto"`` has nothing to refuse."""
    from mtl_plugins.core.aggregation import build_aggregator

    with pytest.raises(MTLConfigError, match=r"gramian_kernel='fast': expected one of "
                                             r"\['auto', 'blas', 'c', 'fused'\]"):
        TaskBackward(TASKS, build_aggregator("pcgrad"), gramian_kernel="fast")
    with pytest.raises(MTLConfigError, match=f"gramian_kernel='{kernel}' with no aggregator"):
        TaskBackward(TASKS, None, gramian_kernel=kernel)
    assert TaskBackward(TASKS, None).gramian_kernel == "auto"
