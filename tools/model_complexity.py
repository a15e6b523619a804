"""Parameters and MACs of the PAD-Net and MTI-Net heads on HRNet-18 at NYUD resolution.

Builds mmseg's ``HRNet`` backbone and this package's multi-task decoders and counts, for one
480×640 image (NYUD-v2 training resolution), with fvcore (backbone and decoder are counted
separately, each once, and summed: the composed model's count is exactly that sum):

- ``GMACs conv+lin``: multiply-accumulates of convolutions and linear layers only — the unit
  of the survey notes' [M] column (BN, ReLU, interpolation not counted);
- ``fvcore total``: fvcore's full count (adds norm layers, interpolation, pooling ...; fvcore
  counts one fused multiply-add as one "flop", i.e. this is also a MAC-like unit).

Next to them: the notes' measurements of the authors' implementation (§5.5, MACs) and the
survey's printed Table V(a) numbers, whose "FLOPS (G)" ≈ 0.5 × conv MACs (notes §5.5: a
quarter of the usual 2·MAC FLOPs).

Backbones:

- ``hr18s``: HRNetV2-W18-Small-v2 (mmseg ``fcn_hr18s`` stages: 2/2/2 blocks, 1/1/3/2 modules),
  the network the survey's "HRNet-18" really is (notes §2.0) — the reproduction rows;
- ``hr18``: full HRNetV2-W18 (mmseg ``configs/_base_/models/fcn_hr18.py`` stages: 4 blocks,
  1/1/4/3 modules) — no survey reference.

Task sets (NYUD): final seg (40 classes) + depth; auxiliary = the final tasks, or
+normals +edges (the survey's NYUD PAD-Net, notes §2.6). "MTL baseline" = backbone + two
HRNet heads (1×1 conv 270 + BN + ReLU, 1×1 conv), to check the backbone count.

    python tools/model_complexity.py                  # full table (≈40 s on 2 CPU cores)
    python tools/model_complexity.py --backbones hr18s --params-only
    python tools/model_complexity.py --markdown       # table as markdown (docs/heads.md)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HR18_EXTRA = dict(  # mmseg configs/_base_/models/fcn_hr18.py
    stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(4,),
                num_channels=(64,)),
    stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(4, 4),
                num_channels=(18, 36)),
    stage3=dict(num_modules=4, num_branches=3, block="BASIC", num_blocks=(4, 4, 4),
                num_channels=(18, 36, 72)),
    stage4=dict(num_modules=3, num_branches=4, block="BASIC", num_blocks=(4, 4, 4, 4),
                num_channels=(18, 36, 72, 144)))


HR18S_CONFIG = Path(__file__).resolve().parents[1] / "configs/mmseg/_base_/models/hr18s_mt.py"


def hr18s_extra() -> dict:
    """HRNetV2-W18-Small-v2 as the project's NYUv2 PAD-Net/MTI-Net configs build it."""
    from mmengine.config import Config

    return Config.fromfile(str(HR18S_CONFIG)).model.backbone.extra.to_dict()


BACKBONES = {"hr18s": hr18s_extra, "hr18": lambda: copy.deepcopy(HR18_EXTRA)}
IN_CHANNELS = [18, 36, 72, 144]
NYUD_CLASSES = 40
AUX_NORMAL_EDGE = ("seg", "depth", "normal", "edge")

# (model, aux) -> (notes [M] params M, notes [M] GMACs, survey params M, survey "FLOPS (G)")
REFERENCE: Dict[Tuple[str, str], Tuple[Optional[float], ...]] = {
    ("baseline", "main"): (4.02, 12.77, 4, 6),
    ("padnet", "+normal+edge"): (12.16, 168.90, 12, 82),
    ("padnet", "main"): (7.02, 70.25, None, None),
    ("mtinet", "main"): (8.58, 17.14, 27, 16),
    ("mtinet", "+normal+edge"): (14.84, 22.88, 27, 16),
}


class _Decoder(nn.Module):
    """A decoder (or a list of single-task heads) as a traceable module of the 4 maps."""

    def __init__(self, decoder: nn.Module, multi_task: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.multi_task = multi_task

    def forward(self, *feats):
        feats = list(feats)
        if not self.multi_task:
            return tuple(h(feats) for h in self.decoder)
        out = self.decoder(feats)
        flat = list(out["final"].values())
        for preds in out["init"].values():
            flat.extend(preds.values())
        return tuple(flat)


class _Backbone(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, img):
        return tuple(self.backbone(img))


def build_backbone(backbone: str) -> nn.Module:
    from mmseg.models.backbones import HRNet
    return HRNet(extra=BACKBONES[backbone]())


def build_decoder(model: str, aux: str) -> nn.Module:
    from mmseg.utils import register_all_modules
    register_all_modules()
    from mmseg.registry import MODELS

    import mtl_plugins.mmseg.heads  # noqa: F401  (registers the heads)

    aux_tasks = AUX_NORMAL_EDGE if aux == "+normal+edge" else None
    if model == "baseline":
        common = dict(in_channels=IN_CHANNELS, in_index=(0, 1, 2, 3), channels=sum(IN_CHANNELS),
                      input_transform="resize_concat", kernel_size=1, num_convs=1,
                      concat_input=False, dropout_ratio=-1, norm_cfg=dict(type="BN"))
        heads = nn.ModuleList([
            MODELS.build(dict(type="FCNHead", num_classes=NYUD_CLASSES, **common)),
            MODELS.build(dict(type="DepthHead", **common))])
        return _Decoder(heads, multi_task=False)
    cfg = dict(type={"padnet": "PADNetHead", "mtinet": "MTINetHead"}[model],
               tasks=("seg", "depth"), aux_tasks=aux_tasks, num_classes=NYUD_CLASSES,
               in_channels=IN_CHANNELS, in_index=(0, 1, 2, 3))
    return _Decoder(MODELS.build(cfg), multi_task=True)


def count(model: nn.Module, inputs: Tuple[torch.Tensor, ...],
          params_only: bool) -> Dict[str, float]:
    """Params (M); conv+linear GMACs and fvcore's total (G) for ``model(*inputs)``."""
    res = {"params": sum(p.numel() for p in model.parameters()) / 1e6}
    if params_only:
        return res
    from fvcore.nn import FlopCountAnalysis
    model.eval()
    with torch.no_grad():
        fca = FlopCountAnalysis(model, inputs)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        by_op = fca.by_operator()
    res["gmacs"] = sum(v for k, v in by_op.items()
                       if k in ("conv", "linear", "addmm", "matmul", "bmm", "einsum")) / 1e9
    res["fvcore_total"] = fca.total() / 1e9
    return res


ROWS = [("baseline", "main"), ("padnet", "+normal+edge"), ("padnet", "main"),
        ("mtinet", "main"), ("mtinet", "+normal+edge")]
NAMES = {"baseline": "MTL baseline", "padnet": "PAD-Net", "mtinet": "MTI-Net"}


def _add(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    return {k: a[k] + b[k] for k in a}


def _fmt(v, nd=2) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["hr18s", "hr18"], choices=list(BACKBONES))
    ap.add_argument("--size", nargs=2, type=int, default=[480, 640], metavar=("H", "W"))
    ap.add_argument("--params-only", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("fvcore").setLevel(logging.ERROR)

    header = ["backbone", "model", "aux tasks", "Params (M)", "GMACs conv+lin", "fvcore total (G)",
              "notes [M] Params", "notes [M] GMACs", "survey Params", 'survey "FLOPS (G)"',
              "0.5×GMACs"]
    rows = []
    t0 = time.time()
    img = torch.zeros(1, 3, *args.size)
    # the composed model's counts are the backbone's plus the decoder's: count each once
    backbones, shapes = {}, None
    for bb in args.backbones:
        torch.manual_seed(0)
        net = build_backbone(bb)
        net.eval()  # mmseg HRNet.train() returns None: do not chain
        if not args.params_only and shapes is None:
            with torch.no_grad():
                shapes = [tuple(f.shape) for f in net(img)]
        backbones[bb] = count(_Backbone(net), (img,), args.params_only)
    decoders = {}
    for model, aux in ROWS:
        torch.manual_seed(0)
        feats = tuple(torch.zeros(s) for s in shapes or ())
        decoders[(model, aux)] = count(build_decoder(model, aux), feats, args.params_only)
    for bb in args.backbones:
        for model, aux in ROWS:
            res = _add(backbones[bb], decoders[(model, aux)])
            ref = REFERENCE.get((model, aux), (None,) * 4) if bb == "hr18s" else (None,) * 4
            g = res.get("gmacs")
            rows.append([bb, NAMES[model], "= final (seg, depth)" if aux == "main" else aux,
                         _fmt(res["params"]), _fmt(g), _fmt(res.get("fvcore_total")),
                         _fmt(ref[0]), _fmt(ref[1]), _fmt(ref[2]), _fmt(ref[3]),
                         _fmt(None if g is None else 0.5 * g, 1)])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"\nNYUD, one {args.size[0]}x{args.size[1]} image, seg 40 classes. "
          "MACs: one multiply-add = 1. "
          "Survey 'FLOPS (G)' ≈ 0.5 × conv MACs (notes §5.5). "
          f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
