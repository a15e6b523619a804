"""yacs configuration of the detectron2 integration: ``add_mtl_config`` and the loss → task map.

Call :func:`add_mtl_config` on a ``get_cfg()`` before ``merge_from_file`` (as detectron2's
projects do with ``add_pointrend_config``). The keys live under ``cfg.MTL``.

The task of every entry of detectron2's loss dict comes from ``MTL.TASK_LOSSES``: a list of
``"task:loss_key"`` strings (or, set from Python, a ``{task: [loss_key, ...]}`` dict). Empty
(the default) means the built-in groups of the tasks named in ``MTL.TASKS``
(:data:`DEFAULT_TASK_LOSSES`): ``detection`` = RPN + box losses, ``mask`` = ``loss_mask``,
``keypoint`` = ``loss_keypoint``, ``sem_seg`` = ``loss_sem_seg``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..core.allocation import MODES, REDUCTIONS, check_gap, steps_per_batch
from ..core.aggregation.gramian_kernels import GRAMIAN_KERNELS
from ..core.backward import LEVELS
from ..core.tasks import MTLConfigError, check_task_names

#: the loss keys of detectron2's R-CNN models, grouped by the task they supervise
DEFAULT_TASK_LOSSES: Dict[str, Tuple[str, ...]] = {
    "detection": ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"),
    "mask": ("loss_mask",),
    "keypoint": ("loss_keypoint",),
    "sem_seg": ("loss_sem_seg",),
}


def add_mtl_config(cfg) -> None:
    """Add the ``MTL`` keys (with their defaults) to a detectron2 yacs config."""
    from detectron2.config import CfgNode as CN

    cfg.MTL = CN()
    # the model's tasks, in the column order of the allocation mask
    cfg.MTL.TASKS = ["detection", "mask"]
    # "task:loss_key" strings mapping every loss of the model to one task; [] = built-in groups
    cfg.MTL.TASK_LOSSES = []
    cfg.MTL.ALLOCATION = CN()
    # ft (every image trains every task), sta (k random tasks per image), ista (all, k per
    # step), gap (ISTA's sub-steps of a batch GAP steps apart: paper 001, Table 7)
    cfg.MTL.ALLOCATION.MODE = "ft"
    # tasks allocated per image per optimizer step (paper 001: 1)
    cfg.MTL.ALLOCATION.K = 1
    # base seed of the allocation streams (each DDP rank draws its own stream from it)
    cfg.MTL.ALLOCATION.SEED = 0
    # MODE "gap" only: optimizer steps between two visits of a batch (1 = ISTA)
    cfg.MTL.ALLOCATION.GAP = 1
    # loss balancer name (e.g. "uncertainty", "dwa", "gradnorm"), "" = fixed weights of 1;
    # "dtp" is refused (detectron2's step has no KPIs to feed it)
    cfg.MTL.BALANCER = ""
    # keyword arguments of the balancer, e.g. {"temperature": 2.0, "period": 500} for DWA
    # (required there: the iterations per DWA period, as detectron2 never ends an epoch)
    cfg.MTL.BALANCER_ARGS = CN(new_allowed=True)
    # gradient aggregator name (e.g. "pcgrad", "cagrad", "mgda"), "" = plain summed loss
    cfg.MTL.AGGREGATOR = ""
    # where the aggregator acts: "parameter" (backbone weights) or "representation" (features)
    cfg.MTL.LEVEL = "parameter"
    # "sum" (detectron2's summed loss dict; k = T reproduces FT) or "mean" (1/T, paper 001)
    cfg.MTL.TASK_REDUCTION = "sum"
    # the exact Gramian of the task gradients: "auto" (the C kernel for float32 gradients on a
    # CPU where it builds, else BLAS), "blas" (chunked cast + BLAS), "c" (one read of G by a C
    # kernel built at first use; CPU) or "fused" (one pass compiled by torch.compile at step 1)
    cfg.MTL.GRAMIAN_KERNEL = "auto"
    # no silent no-op: within this many real optimizer steps every configured method (the
    # aggregator, the balancer) must have acted, or training stops with an error; 0 = off
    cfg.MTL.CHECK_EXERCISED = 10
    cfg.MTL.GRADSPLIT = CN()
    # module-name patterns of the convs whose output channels are split into task groups
    # (paper 000: every conv of the last stage), e.g. ["backbone.bottom_up.res5.*"]
    # (res5's conv1/conv2/conv3 and shortcut convs); [] = GradSplit off
    cfg.MTL.GRADSPLIT.MODULES = []
    # [T][T] 0/1 relation (row: receiving group, column: source task); [] = identity
    cfg.MTL.GRADSPLIT.RELATION = []
    # or a JSON file: tools/gradsplit_relations.py --out, or its results input; "" = none
    cfg.MTL.GRADSPLIT.RELATION_FILE = ""
    # DropGrad baseline (paper 000 Table 4): drop rate p in [0, 1); None = GradSplit
    cfg.MTL.GRADSPLIT.DROP_RATE = None
    # seed of DropGrad's masks (the same on every rank)
    cfg.MTL.GRADSPLIT.SEED = 0
    # one optimizer state per task, each stepped on its own task's gradient (paper 000 §4.1)
    cfg.MTL.GRADSPLIT.SEPARATE_OPTIMIZERS = False
    cfg.MTL.RECON_SEARCH = CN()
    # Recon stage 1 (paper 004): count per shared layer the task-gradient pairs with cos < S
    cfg.MTL.RECON_SEARCH.ENABLED = False
    # module-name patterns to watch ([] = every module holding shared parameters)
    cfg.MTL.RECON_SEARCH.MODULES = []
    # conflict threshold on the cosine similarity
    cfg.MTL.RECON_SEARCH.S = -0.02
    # ranking JSON, relative to OUTPUT_DIR (written at every checkpoint and at the end)
    cfg.MTL.RECON_SEARCH.OUT = "recon_ranking.json"
    cfg.MTL.ROAMING = CN()
    # Maximum Roaming (paper 002): module names / glob patterns of the backbone layers whose
    # output channels get per-task masks (post-norm, pre-activation: a detectron2 Conv2d with
    # its built-in norm), e.g. ["backbone.bottom_up.res5.*.conv[123]"]; [] = off
    cfg.MTL.ROAMING.LAYERS = []
    # sharing ratio p in (0, 1]: each task uses round(p*C) channels of every masked layer
    cfg.MTL.ROAMING.P = 0.8
    # Δ, the interval between two roaming updates (one filter swap per task per layer), in
    # epochs as paper 002 states it ("we express it in terms of training epochs"; good range
    # 0.05-1): converted to optimizer steps with len(DATASETS.TRAIN) / SOLVER.IMS_PER_BATCH
    # (x ceil(T/k) under ISTA); 0 = unset. INTERVAL: Δ in optimizer steps instead; 0 = unset.
    # Both unset: the paper's Δ = 0.1 epoch. Both set: refused.
    cfg.MTL.ROAMING.INTERVAL_EPOCHS = 0.0
    cfg.MTL.ROAMING.INTERVAL = 0
    # r in [0, 1]: fraction of the roaming plan to run (1.0: until every filter was visited)
    cfg.MTL.ROAMING.COMPLETION = 1.0
    # mask init: "exact" (exact count, covering deal; the official code) or "bernoulli" (paper)
    cfg.MTL.ROAMING.INIT = "exact"
    # seed of the masks and swaps (same on every DDP rank; its state is checkpointed)
    cfg.MTL.ROAMING.SEED = 0
    cfg.MTL.RECON = CN()
    # Recon stage 2 (paper 004): ranking JSON of the search stage (MTL.RECON_SEARCH writes it);
    # its top MTL.RECON.TOPK modules become per-task copies; "" = off (or see MODULES)
    cfg.MTL.RECON.RANKING = ""
    # number of top-ranked modules to convert (with RANKING only)
    cfg.MTL.RECON.TOPK = 0
    # explicit module names / patterns to convert instead of a ranking; [] = off
    cfg.MTL.RECON.MODULES = []
    # "copy": every copy starts from the module's (pretrained) weights; "reset": re-initialised
    cfg.MTL.RECON.INIT = "copy"
    cfg.MTL.MULTI_DATASET = CN()
    # train on DATASETS.TRAIN with batches drawn one dataset at a time (paper 000)
    cfg.MTL.MULTI_DATASET.ENABLED = False
    # "dataset:task1,task2" per training dataset: the tasks it annotates ([] = all MTL.TASKS)
    cfg.MTL.MULTI_DATASET.DATASET_TASKS = []
    # batches of each dataset per period, one int per DATASETS.TRAIN entry ([] = round-robin)
    cfg.MTL.MULTI_DATASET.RATIOS = []


def _mtl_node(cfg):
    mtl = getattr(cfg, "MTL", None)
    if mtl is None:
        raise MTLConfigError("cfg.MTL is missing: call mtl_plugins.d2.add_mtl_config(cfg) "
                             "before merge_from_file")
    return mtl


def task_loss_mapping(cfg_or_mtl: Any) -> Dict[str, Tuple[str, ...]]:
    """``{task: (loss_key, ...)}`` from ``MTL.TASKS`` and ``MTL.TASK_LOSSES``, checked.

    Accepts the whole config or its ``MTL`` node. Raises :class:`MTLConfigError` naming the
    key for a malformed entry, a task outside ``MTL.TASKS``, a loss key given to two tasks
    or a task of ``MTL.TASKS`` with no loss key.
    """
    mtl = cfg_or_mtl.MTL if hasattr(cfg_or_mtl, "MTL") else cfg_or_mtl
    tasks = check_task_names(list(mtl.TASKS), key="MTL.TASKS")
    spec = mtl.TASK_LOSSES
    mapping: Dict[str, list] = {t: [] for t in tasks}
    if isinstance(spec, Mapping):
        pairs = [(t, k) for t, keys in spec.items()
                 for k in ([keys] if isinstance(keys, str) else keys)]
    else:
        pairs = []
        for entry in spec:
            if not isinstance(entry, str) or entry.count(":") != 1 or \
                    not all(part.strip() for part in entry.split(":")):
                raise MTLConfigError(
                    f"MTL.TASK_LOSSES contains {entry!r}: expected 'task:loss_key' strings, "
                    "e.g. 'detection:loss_cls'")
            task, key = (part.strip() for part in entry.split(":"))
            pairs.append((task, key))
    if not pairs:
        missing = [t for t in tasks if t not in DEFAULT_TASK_LOSSES]
        if missing:
            raise MTLConfigError(
                f"MTL.TASK_LOSSES=[]: task(s) {missing} of MTL.TASKS have no built-in loss "
                f"group (built-in: {sorted(DEFAULT_TASK_LOSSES)}); list 'task:loss_key' entries")
        pairs = [(t, k) for t in tasks for k in DEFAULT_TASK_LOSSES[t]]
    owner: Dict[str, str] = {}
    for task, key in pairs:
        if task not in mapping:
            raise MTLConfigError(
                f"MTL.TASK_LOSSES: {task}:{key} names task {task!r}, which is not in "
                f"MTL.TASKS={list(tasks)}")
        if key in owner and owner[key] != task:
            raise MTLConfigError(
                f"MTL.TASK_LOSSES: loss key {key!r} is given to tasks {owner[key]!r} and "
                f"{task!r}; expected exactly one task per loss key")
        if key not in owner:
            owner[key] = task
            mapping[task].append(key)
    empty = [t for t, keys in mapping.items() if not keys]
    if empty:
        raise MTLConfigError(
            f"MTL.TASK_LOSSES: task(s) {empty} of MTL.TASKS={list(tasks)} have no loss key; "
            "expected at least one 'task:loss_key' entry per task")
    return {t: tuple(keys) for t, keys in mapping.items()}


def loss_owner(mapping: Mapping[str, Sequence[str]]) -> Dict[str, str]:
    """``{loss_key: task}`` from ``{task: loss_keys}``."""
    return {k: t for t, keys in mapping.items() for k in keys}


def group_task_losses(loss_dict: Mapping[str, torch.Tensor],
                      mapping: Mapping[str, Sequence[str]]) -> Dict[str, torch.Tensor]:
    """Sum detectron2's ``loss_dict`` into ``{task: loss}`` by ``mapping`` (``{task: keys}``).

    Raises :class:`MTLConfigError` for a loss key that belongs to no task (naming
    ``MTL.TASK_LOSSES``) and for a task none of whose keys the model returned.
    """
    owner = loss_owner(mapping)
    unmapped = [k for k in loss_dict if k not in owner]
    if unmapped:
        raise MTLConfigError(
            f"MTL.TASK_LOSSES: the model returned loss key(s) {unmapped} that belong to no "
            f"task; expected every key of {sorted(loss_dict)} in the mapping "
            f"{dict((t, list(k)) for t, k in mapping.items())} (add 'task:{unmapped[0]}')")
    out: Dict[str, torch.Tensor] = {}
    for task, keys in mapping.items():
        present = [loss_dict[k] for k in keys if k in loss_dict]
        if not present:
            raise MTLConfigError(
                f"MTL.TASK_LOSSES: task {task!r} has none of its loss keys {list(keys)} in the "
                f"model's loss dict {sorted(loss_dict)}; expected at least one (is the head "
                "of this task enabled, e.g. MODEL.MASK_ON?)")
        out[task] = present[0] if len(present) == 1 else torch.stack(
            [v.reshape(()) for v in present]).sum()
    return out


def check_step_settings(settings: Mapping[str, Any], num_tasks: int,
                        name: Callable[[str], str]) -> None:
    """Check the scalar MTL settings shared by the yacs ``MTL`` node and LazyConfig dicts:
    ``allocation.mode`` in ``MODES``, ``allocation.k`` in ``[1, T]``, an integer
    ``allocation.seed``, ``allocation.gap`` (:func:`check_gap`), ``level`` in ``LEVELS``,
    ``task_reduction`` in ``REDUCTIONS``, ``gramian_kernel`` in ``GRAMIAN_KERNELS``.
    ``settings`` maps those dotted names to values; ``name(field)`` spells a field's config key
    in the errors (``MTL.ALLOCATION.K``, ``train.mtl.allocation.k``)."""
    for field, choices in (("allocation.mode", MODES), ("level", LEVELS),
                           ("task_reduction", REDUCTIONS),
                           ("gramian_kernel", GRAMIAN_KERNELS)):
        if settings[field] not in choices:
            raise MTLConfigError(f"{name(field)}={settings[field]!r}: expected one of "
                                 f"{list(choices)}")
    k = settings["allocation.k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_tasks:
        raise MTLConfigError(f"{name('allocation.k')}={k!r}: expected an integer in "
                             f"[1, {num_tasks}] (the number of {name('tasks')})")
    seed = settings["allocation.seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MTLConfigError(f"{name('allocation.seed')}={seed!r}: expected an integer")
    check_gap(settings["allocation.mode"], settings["allocation.gap"], name("allocation.gap"))


def check_mtl_config(cfg) -> None:
    """Validate the scalar ``MTL`` keys, raising :class:`MTLConfigError` naming key and value."""
    mtl = _mtl_node(cfg)
    task_loss_mapping(mtl)
    check_step_settings({"allocation.mode": mtl.ALLOCATION.MODE, "allocation.k": mtl.ALLOCATION.K,
                         "allocation.seed": mtl.ALLOCATION.SEED,
                         "allocation.gap": mtl.ALLOCATION.GAP, "level": mtl.LEVEL,
                         "task_reduction": mtl.TASK_REDUCTION,
                         "gramian_kernel": mtl.GRAMIAN_KERNEL},
                        len(mtl.TASKS), lambda field: "MTL." + field.upper())
    roaming, recon = structure_model_configs(cfg)
    if mtl.LEVEL == "representation" and (roaming is not None or recon is not None):
        raise MTLConfigError(
            f"MTL.LEVEL='representation' with MTL.{'ROAMING' if roaming else 'RECON'}: the "
            "backbone runs once per task, so there is no single shared representation; "
            "expected MTL.LEVEL='parameter'")


def build_mtl_controller(cfg, rank: int | None = None):
    """The :class:`~mtl_plugins.core.controller.MTLController` described by ``cfg.MTL``.

    AMP follows ``SOLVER.AMP.ENABLED`` (the controller's dynamic loss scaler replaces
    detectron2's ``GradScaler``).
    """
    from ..core.controller import MTLController

    check_mtl_config(cfg)
    mtl = cfg.MTL
    if rank is None:
        from detectron2.utils import comm
        rank = comm.get_rank()
    kwargs = dict(allocation=dict(mode=mtl.ALLOCATION.MODE, k=int(mtl.ALLOCATION.K),
                                  seed=int(mtl.ALLOCATION.SEED),
                                  gap=int(mtl.ALLOCATION.GAP)),
                  level=mtl.LEVEL, task_reduction=mtl.TASK_REDUCTION,
                  amp=bool(cfg.SOLVER.AMP.ENABLED), rank=rank,
                  check_exercised=mtl.CHECK_EXERCISED, gramian_kernel=mtl.GRAMIAN_KERNEL)
    for key, arg in (("BALANCER", "balancer"), ("AGGREGATOR", "aggregator")):
        name = getattr(mtl, key)
        if not isinstance(name, str):
            raise MTLConfigError(f"MTL.{key}={name!r}: expected a method name or ''")
        kwargs[arg] = name or None
    kwargs["balancer"] = _balancer_spec(mtl)
    try:
        controller = MTLController(list(mtl.TASKS), **kwargs)
    except MTLConfigError as err:
        named = ", ".join(f"MTL.{k}={getattr(mtl, k)!r}" for k in ("BALANCER", "AGGREGATOR")
                          if getattr(mtl, k))
        message = str(err).replace("balancer.", "MTL.BALANCER_ARGS.").replace(
            "gramian_kernel=", "MTL.GRAMIAN_KERNEL=")
        raise MTLConfigError(f"{named or 'cfg.MTL'}: {message}") from err
    check_balancer_acts(controller, "MTL.BALANCER", "MTL.BALANCER_ARGS.period")
    controller.config_keys = {"balancer": "MTL.BALANCER", "aggregator": "MTL.AGGREGATOR",
                              "check_exercised": "MTL.CHECK_EXERCISED"}
    return controller


def _balancer_spec(mtl) -> Any:
    """``MTL.BALANCER`` with ``MTL.BALANCER_ARGS``: a name, ``dict(type=name, **args)`` or
    ``None`` (fixed weights)."""
    args = dict(getattr(mtl, "BALANCER_ARGS", None) or {})
    if not mtl.BALANCER:
        if args:
            raise MTLConfigError(f"MTL.BALANCER_ARGS={args!r} with MTL.BALANCER='': expected "
                                 "a balancer name in MTL.BALANCER for these arguments")
        return None
    return dict(type=mtl.BALANCER, **args) if args else mtl.BALANCER


def check_balancer_acts(controller, key: str, period_key: str) -> None:
    """Refuse a balancer that detectron2's training step would leave at its initial weights
    (no silent no-op): DWA without a period in iterations (detectron2 never ends an epoch,
    so ``on_epoch_end`` never runs) and DTP (no KPI source in the step). ``key`` names the
    balancer's config key, ``period_key`` where DWA's period goes."""
    from ..core.balancing import DynamicTaskPrioritization, DynamicWeightAverage

    balancer = controller.balancer
    if isinstance(balancer, DynamicWeightAverage) and balancer.period is None:
        raise MTLConfigError(
            f"{key}='dwa' without a period: DWA closes its loss-averaging periods at "
            "on_epoch_end, which detectron2's iteration-based loop never calls, so its weights "
            f"would stay 1; expected {period_key}=<iterations per period> (e.g. one epoch: "
            "the dataset size / SOLVER.IMS_PER_BATCH)")
    if isinstance(balancer, DynamicTaskPrioritization):
        raise MTLConfigError(
            f"{key}='dtp': DTP weights the tasks by KPIs fed through update_kpis, and "
            "detectron2's training step has no KPI source, so its weights would stay at "
            "init_weight; expected another balancer (e.g. 'dwa' with a period, 'uncertainty')")


#: ``_BASE_`` prefix that names a config of detectron2's installed model zoo
MODEL_ZOO_PREFIX = "model_zoo://"


def merge_config_file(cfg, path: str) -> None:
    """``cfg.merge_from_file(path)`` that also accepts ``_BASE_: "model_zoo://<name>.yaml"``.

    detectron2 resolves ``_BASE_`` relative to the file, which cannot reach the model zoo of
    an installed (non-editable) detectron2. A chain of files whose root ``_BASE_`` is
    ``model_zoo://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml`` is merged as: the
    model-zoo file (with its own bases), then every file of the chain from the root down.
    Files without such a root are merged by detectron2 unchanged.
    """
    import os

    import yaml
    from detectron2 import model_zoo

    chain, current, zoo = [], path, None
    while True:
        with open(current) as f:
            data = yaml.safe_load(f) or {}
        base = data.pop("_BASE_", None)
        chain.append(data)
        if base is None:
            break
        if base.startswith(MODEL_ZOO_PREFIX):
            zoo = base[len(MODEL_ZOO_PREFIX):]
            break
        current = os.path.join(os.path.dirname(current), os.path.expanduser(base))
    if zoo is None:
        cfg.merge_from_file(path)
        return
    cfg.merge_from_file(model_zoo.get_config_file(zoo))
    for data in reversed(chain):
        cfg.merge_from_other_cfg(type(cfg)(data))


def structure_configs(cfg):
    """``(gradsplit, recon_search)`` config dicts from ``MTL.GRADSPLIT`` / ``MTL.RECON_SEARCH``
    (``None`` when off), checked (errors name the key)."""
    from ..core.structure.from_config import check_gradsplit_cfg, check_recon_search_cfg
    from ..core.structure.gradsplit import load_relation

    mtl = _mtl_node(cfg)
    gradsplit = recon = None
    if list(mtl.GRADSPLIT.MODULES):
        gs = mtl.GRADSPLIT
        relation = [list(r) for r in gs.RELATION] or None
        if gs.RELATION_FILE:
            if relation is not None:
                raise MTLConfigError(f"MTL.GRADSPLIT.RELATION={relation!r} and "
                                     f"MTL.GRADSPLIT.RELATION_FILE={gs.RELATION_FILE!r}: "
                                     "expected one of them")
            relation = load_relation(gs.RELATION_FILE, list(mtl.TASKS),
                                     key="MTL.GRADSPLIT.RELATION_FILE").int().tolist()
        gradsplit = check_gradsplit_cfg(
            dict(modules=list(gs.MODULES), relation=relation, drop_rate=gs.DROP_RATE,
                 seed=gs.SEED, separate_optimizers=gs.SEPARATE_OPTIMIZERS),
            list(mtl.TASKS), "MTL.GRADSPLIT", upper=True)
    if mtl.RECON_SEARCH.ENABLED:
        recon = check_recon_search_cfg(
            dict(modules=list(mtl.RECON_SEARCH.MODULES) or None, S=float(mtl.RECON_SEARCH.S),
                 out=mtl.RECON_SEARCH.OUT), "MTL.RECON_SEARCH")
    return gradsplit, recon


def structure_model_configs(cfg) -> Tuple[Optional[dict], Optional[dict]]:
    """``(roaming, recon)`` config dicts of the model from ``MTL.ROAMING`` / ``MTL.RECON``
    (``None`` when off), checked (errors name the yacs key). They are the ``mtl_roaming`` /
    ``mtl_recon`` arguments of :class:`~mtl_plugins.d2.modeling.MTLGeneralizedRCNN`."""
    from ..core.structure.from_config import check_recon_cfg, check_roaming_cfg

    mtl = _mtl_node(cfg)
    roaming = recon = None
    node = mtl.ROAMING
    if list(node.LAYERS):
        roaming = check_roaming_cfg(
            dict(layers=list(node.LAYERS), p=node.P, interval=node.INTERVAL or None,
                 interval_epochs=node.INTERVAL_EPOCHS or None,
                 completion=node.COMPLETION, init=node.INIT, seed=node.SEED),
            "MTL.ROAMING", upper=True)
    node = mtl.RECON
    if node.RANKING or list(node.MODULES) or node.TOPK:
        recon = {"init": node.INIT}
        if node.RANKING:
            recon["ranking"] = node.RANKING
        if list(node.MODULES):
            recon["modules"] = list(node.MODULES)
        if node.TOPK:
            recon["topk"] = node.TOPK
        check_recon_cfg(recon, "MTL.RECON", upper=True)  # the ranking is read at model build
    return roaming, recon


def roaming_steps_per_epoch(cfg) -> Optional[float]:
    """Optimizer steps per epoch for Maximum Roaming's Δ in epochs (``MTL.ROAMING``), or
    ``None`` when roaming is off or Δ is given in steps: the images of ``DATASETS.TRAIN`` as
    detectron2's train loader sees them (``get_detection_dataset_dicts`` with the loader's
    empty-annotation / keypoint filters) over ``SOLVER.IMS_PER_BATCH`` (the batch of all
    processes together), times ``ceil(T/k)`` under ISTA and gap (one optimizer step per
    sub-step)."""
    from detectron2.data import get_detection_dataset_dicts

    from ..core.structure.roaming import optimizer_steps_per_epoch

    roaming, _ = structure_model_configs(cfg)
    if roaming is None or roaming.get("interval") is not None:
        return None
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                       if cfg.MODEL.KEYPOINT_ON else 0),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    mtl = _mtl_node(cfg)
    sub_steps = steps_per_batch(mtl.ALLOCATION.MODE, len(mtl.TASKS), int(mtl.ALLOCATION.K))
    try:
        return optimizer_steps_per_epoch(len(dicts), int(cfg.SOLVER.IMS_PER_BATCH),
                                         steps_per_batch=sub_steps)
    except MTLConfigError as e:
        raise MTLConfigError(f"MTL.ROAMING.INTERVAL_EPOCHS: cannot count the optimizer steps "
                             f"of an epoch of DATASETS.TRAIN={list(cfg.DATASETS.TRAIN)} with "
                             f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} ({e}); expected "
                             "a non-empty dataset, or Δ in steps (MTL.ROAMING.INTERVAL)") \
            from None
