"""A 2-process gloo run of the engine matches a 1-process run on the union batch.

Every 2-rank case of this module runs in one spawned pair of processes (:func:`ddp_run`: one
process group, the jobs one after another, each writing ``<job>/rank<r>.pt``); each test checks
its own job's files. Every job builds its own models and seeds (``TinyMTL(seed=0)``), as a fresh
process would."""
import os
import traceback

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


def _join(rank: int, world: int, init_file: str):
    """The 8-sample batch and this rank's half of it (the gloo group is :func:`_all_jobs`')."""
    assert dist.get_rank() == rank and dist.get_world_size() == world
    x, y = batch(n=8)
    return x, y, slice(rank * 4, rank * 4 + 4)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    x, y, half = _join(rank, world, init_file)
    model = TinyMTL()
    # rank 0 has no depth labels this step: depth is averaged over rank 1 alone
    result, grads = _grads(model, x[half], y[half], drop=("depth",) if rank == 0 else ())
    torch.save({"tasks": result.tasks, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_match_one_rank_on_the_union_batch(ddp_run):
    ranks = ddp_run("union")
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
        saved = ranks[rank]
        assert saved["tasks"] == list(TASKS)
        for name, g in reference.items():
            assert torch.allclose(saved["grads"][name], g, atol=1e-6), (rank, name)


# ----------------------------------------------------------------------------- issue 10
# One rule on every path (defect 8): each task's gradient is the mean over the ranks that
# have it; learnable loss weights (extras) follow it too; a rank with no task at all takes
# part (defect 7); when no rank has a task, every rank is told to skip the step.

def _uncertainty(losses, log_vars):
    return {t: torch.exp(-log_vars[TASKS.index(t)]) * l + log_vars[TASKS.index(t)]
            for t, l in losses.items()}


def _step(model, log_vars, x, y, path, drop=(), ddp=None):
    from mtl_plugins.core.backward import TaskBackward

    model.zero_grad(set_to_none=True)
    log_vars.grad = None
    z, out = (ddp or model)(x)
    losses = _uncertainty({t: l for t, l in task_losses(out, y).items() if t not in drop},
                          log_vars)
    shared, heads = split_parameters(model.encoder, model.heads)
    engine = TaskBackward(TASKS, None if path == "plain" else UnitSum(),
                          level="representation" if path == "representation" else "parameter")
    keepalive = torch.stack([o.sum() for o in out.values()]).sum() if path == "plain" else None
    result = engine(losses, shared, heads, features=z, extra_params=[log_vars],
                    keepalive=keepalive)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if log_vars.grad is not None:
        grads["log_vars"] = log_vars.grad.clone()
    return result, grads


def _rule_worker(rank, world, init_file, out_dir, path, scenario):
    x, y, half = _join(rank, world, init_file)
    model = TinyMTL()
    log_vars = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if path == "plain" else None
    drop = {"depth_on_rank0": ("depth",) if rank == 0 else (),
            "rank0_empty": TASKS if rank == 0 else (),
            "all_empty": TASKS}[scenario]
    result, grads = _step(model, log_vars, x[half], y[half], path, drop, ddp)
    torch.save({"tasks": result.tasks, "empty": result.empty, "grads": grads},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _union_reference(path, scenario):
    """The 1-process step on the union batch, each task over the samples that have it."""
    x, y = batch(n=8)
    model = TinyMTL()
    log_vars = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
    if scenario == "rank0_empty":  # only rank 1's half has tasks
        return _step(model, log_vars, x[4:], y[4:], path)[1]
    model.zero_grad(set_to_none=True)
    _, out = model(x)
    losses = task_losses(out, y)
    losses["depth"] = ((out["depth"][4:] - y[4:, 1]) ** 2).mean()
    losses = _uncertainty(losses, log_vars)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["log_vars"] = log_vars.grad.clone()
    return grads


RULE_CASES = [("plain", "depth_on_rank0"), ("plain", "rank0_empty"), ("plain", "all_empty"),
              ("parameter", "rank0_empty"), ("parameter", "all_empty"),
              ("representation", "depth_on_rank0"), ("representation", "rank0_empty"),
              ("representation", "all_empty")]


@pytest.mark.parametrize("path,scenario", RULE_CASES)
def test_one_normalisation_rule_and_empty_ranks(ddp_run, path, scenario):
    saved = ddp_run(f"rule-{path}-{scenario}")
    for name in saved[0]["grads"]:  # ranks identical
        torch.testing.assert_close(saved[0]["grads"][name], saved[1]["grads"][name])
    if scenario == "all_empty":
        assert saved[0]["empty"] and saved[1]["empty"]  # every rank skips the step
        heads = [n for n in saved[0]["grads"] if n.startswith("heads.")]
        assert not heads, heads  # no head gets a (zero) gradient the optimizer would apply
        return
    assert not saved[0]["empty"] and not saved[1]["empty"]
    if path == "representation":  # each rank aggregates its own G: heads/extras follow the rule
        reference = _union_reference("plain", scenario)
        names = [n for n in reference if n.startswith("heads.") or n == "log_vars"]
    else:
        reference = _union_reference(path, scenario)
        names = list(reference)
    for name in names:
        torch.testing.assert_close(saved[0]["grads"][name], reference[name], atol=1e-6,
                                   rtol=1e-5, msg=name)


# GradNorm under DDP: L_t and ||grad_W L_t|| are those of the rank-averaged task loss, so every
# rank records the same L_t(0) and computes the same weight gradient, equal to 1 process on the
# union batch (each task over the samples that have it).

def _gradnorm_step(x, y, drop=(), halves=None):
    from mtl_plugins.core.balancing.gradnorm import GradNorm

    model = TinyMTL()
    balancer = GradNorm(TASKS, alpha=1.5)
    _, out = model(x)
    losses = {t: l for t, l in task_losses(out, y).items() if t not in drop}
    if halves is not None:
        losses["depth"] = ((out["depth"][halves] - y[halves, 1]) ** 2).mean()
    last = [p for p in model.encoder.parameters() if p.dim() > 1][-1]
    balancer.balance_grads(losses, [last])
    return {"grad": balancer.weight_grad.clone(),
            "initial": balancer.initial_losses.clone()}


def _gradnorm_worker(rank, world, init_file, out_dir, scenario):
    x, y, half = _join(rank, world, init_file)
    drop = {"depth_on_rank0": ("depth",), "rank0_empty": TASKS}[scenario] if rank == 0 else ()
    torch.save(_gradnorm_step(x[half], y[half], drop), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("scenario", ["depth_on_rank0", "rank0_empty"])
def test_gradnorm_under_ddp_equals_one_process_on_the_union_batch(ddp_run, scenario):
    saved = ddp_run(f"gradnorm-{scenario}")
    x, y = batch(n=8)
    if scenario == "rank0_empty":
        reference = _gradnorm_step(x[4:], y[4:])
    else:
        reference = _gradnorm_step(x, y, halves=slice(4, 8))
    for s in saved:
        torch.testing.assert_close(s["initial"], reference["initial"], equal_nan=True)
        torch.testing.assert_close(s["grad"], reference["grad"], atol=1e-6, rtol=1e-5)


def _train_controller(x, y, balancer, drop, after_step=True, grow_inputs=False):
    """Three steps of a TinyMTL under ``MTLController(balancer, PCGrad)`` on this rank's
    ``x, y``; ``drop(step, losses)`` returns the losses this rank has in that step;
    ``grow_inputs``: step s feeds ``x * (1 + s)`` (losses that move)."""
    from mtl_plugins.core.controller import MTLController

    model = TinyMTL()
    ctl = MTLController(TASKS, balancer=balancer, aggregator="pcgrad")
    shared, heads = split_parameters(model.encoder, model.heads)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        _, out = model(x * (1 + step) if grow_inputs else x)
        losses = drop(step, task_losses(out, y))
        ctl.backward(losses, shared, heads)
        if after_step:
            ctl.after_step(losses)
    return model, ctl


def _rlw_worker(rank, world, init_file, out_dir):
    x, y, half = _join(rank, world, init_file)
    # rank 0 has no task in step 1
    _, ctl = _train_controller(x[half], y[half], "rlw",
                               lambda step, losses: {} if rank == 0 and step == 1 else losses,
                               after_step=False)
    torch.save(ctl.balancer.get_extra_state(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_random_loss_weights_stay_in_step_across_an_empty_rank(ddp_run):
    a, b = ddp_run("rlw")
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["last"], b["last"])


def _rlw_unseeded_worker(rank, world, init_file, out_dir):
    from mtl_plugins.core.balancing.rlw import RandomLossWeighting
    from mtl_plugins.core.tasks import MTLConfigError

    _join(rank, world, init_file)
    balancer = RandomLossWeighting(TASKS, seed=None)
    try:
        balancer({"seg": torch.ones(())})
        message = ""
    except MTLConfigError as e:
        message = str(e)
    torch.save(message, os.path.join(out_dir, f"rank{rank}.pt"))


def test_unseeded_random_loss_weights_are_refused_under_ddp(ddp_run):
    for message in ddp_run("rlw-unseeded"):
        assert "balancer.seed=None: under DDP" in message


def _sync_bn_worker(rank, world, init_file, out_dir, sync_bn):
    from mtl_plugins.core.aggregation import PCGrad
    from mtl_plugins.core.tasks import MTLConfigError

    x, y, half = _join(rank, world, init_file)
    model = TinyMTL()
    engine = TaskBackward(TASKS, PCGrad())
    engine.sync_bn = sync_bn
    _, out = model(x[half])
    losses = {t: l for t, l in task_losses(out, y[half]).items()
              if not (rank == 0 and t == "depth")}
    shared, heads = split_parameters(model.encoder, model.heads)
    try:
        engine(losses, shared, heads)
        message = ""
    except MTLConfigError as e:
        message = str(e)
    torch.save(message, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("sync_bn", [True, False])
def test_an_aggregator_with_sync_bn_and_a_partial_task_is_refused_on_every_rank(ddp_run,
                                                                                sync_bn):
    """With SyncBN each task's backward runs collectives: a task on one rank only would pair
    them up wrongly (a hang on GPUs). Every rank raises alike instead; without SyncBN the
    step runs."""
    for message in ddp_run(f"sync-bn-{sync_bn}"):
        if sync_bn:
            assert "with SyncBatchNorm under DDP: task(s) ['depth']" in message
        else:
            assert message == ""


def _forward_state_worker(rank, world, init_file, out_dir, balancer):
    x, y, half = _join(rank, world, init_file)

    def drop(step, losses):
        if rank == 0 and step == 1:
            losses.pop("depth")  # a task missing on one rank
        if rank == 0 and step == 2:
            losses = {}  # and a rank without any task
        return losses

    _, ctl = _train_controller(x[half], y[half], balancer, drop, grow_inputs=True)
    torch.save({k: v for k, v in ctl.balancer.state_dict().items()},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("balancer", ["famo", "gls"])
def test_balancers_weighting_in_forward_keep_identical_state_on_every_rank(ddp_run, balancer):
    """FAMO (update='next_forward') and GLS build their state in forward: from the losses
    averaged over the ranks that have each task, so the ranks' states stay identical."""
    a, b = ddp_run(f"forward-state-{balancer}")
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], equal_nan=True, msg=k)


def _gradnorm_controller_worker(rank, world, init_file, out_dir):
    x, y, half = _join(rank, world, init_file)
    # rank 0 has no task in the first step: the layer comes from rank 1
    model, ctl = _train_controller(
        x[half], y[half], dict(type="gradnorm", lr=0.01),
        lambda step, losses: {} if rank == 0 and step == 0 else losses)
    names = {id(p): n for n, p in model.named_parameters()}
    torch.save({"layer": [names[id(p)] for p in ctl.gradnorm_layer],
                "state": ctl.balancer.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_gradnorm_layer_and_weights_agree_across_ranks(ddp_run):
    """GradNorm's last shared layer is resolved alike on every rank (union of the ranks'
    choices; a rank without any task has none) and its own optimizer steps identically."""
    a, b = ddp_run("gradnorm-controller")
    assert a["layer"] == b["layer"] == ["encoder.2.weight"]
    assert float(a["state"]["num_updates"]) == 3.0
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], equal_nan=True)


# ----------------------------------------------------------------------------- the one 2-rank run
#: job name -> (worker, its arguments after ``out_dir``): every 2-rank case of this module
JOBS = {"union": (_worker, ()),
        **{f"rule-{p}-{s}": (_rule_worker, (p, s)) for p, s in RULE_CASES},
        **{f"gradnorm-{s}": (_gradnorm_worker, (s,)) for s in ("depth_on_rank0", "rank0_empty")},
        "rlw": (_rlw_worker, ()),
        "rlw-unseeded": (_rlw_unseeded_worker, ()),
        **{f"sync-bn-{b}": (_sync_bn_worker, (b,)) for b in (True, False)},
        **{f"forward-state-{b}": (_forward_state_worker, (b,)) for b in ("famo", "gls")},
        "gradnorm-controller": (_gradnorm_controller_worker, ())}


def _all_jobs(rank: int, world: int, init_file: str, root: str) -> None:
    """One gloo group; every job of :data:`JOBS` in turn, into ``<root>/<job>/``. A job that
    raises ends this process (the other rank is then stopped by ``mp.spawn``)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        for name, (worker, args) in JOBS.items():
            out_dir = os.path.join(root, name)
            os.makedirs(out_dir, exist_ok=True)
            try:
                worker(rank, world, init_file, out_dir, *args)
            except BaseException:
                with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
                    f.write(traceback.format_exc())
                raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Runs :data:`JOBS` in 2 spawned gloo processes once; ``ddp_run(job)``: the two ranks'
    saved outputs of that job (the test fails if a rank did not write its own)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    root = tmp_path_factory.mktemp("ddp")
    try:
        mp.spawn(_all_jobs, args=(2, str(root / "init"), str(root)), nprocs=2, join=True)
        failure = None
    except Exception as e:  # the jobs before the failed one still have their outputs
        failure = e

    def outputs(name):
        job = root / name
        files = [job / f"rank{r}.pt" for r in range(2)]
        if not all(f.exists() for f in files):
            errors = "".join(f.read_text() for f in sorted(job.glob("error*.txt")))
            pytest.fail(f"job {name} of the 2-rank run did not finish: {failure}\n{errors}")
        return [torch.load(f) for f in files]

    return outputs
