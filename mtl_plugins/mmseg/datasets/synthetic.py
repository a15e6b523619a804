"""Procedural indoor scenes for multi-task dense prediction: no files, no downloads.

Each sample is a deterministic function of ``(seed, index)``: a room (floor, back wall, two side
walls of finite height) with a few axis-aligned boxes, spheres and vertical cylinders standing on
the floor, seen by a pinhole camera 1.2–1.7 m above the floor, pitched down 5–20° and turned by up
to ±15°. An analytic numpy ray-caster gives, for every pixel, the nearest surface, from which:

* ``seg``: the class of the surface (``SYNTHETIC_CLASSES``: floor, wall, box, sphere, cylinder;
  255 where the ray leaves the room above the walls);
* ``depth``: z-depth in metres (distance along the optical axis; 0 = no surface);
* ``normal``: unit surface normal in the camera frame, x right, y up, z towards the camera
  (OpenGL convention; a horizontal flip negates x), zero vector where there is no surface;
  the floor's normal is ``(0, cos(pitch), sin(pitch))`` rotated by nothing else (yaw is about
  the vertical axis), i.e. it points up;
* ``edge``: 1 on pixels whose 4-neighbour belongs to another object or whose normal differs by
  more than 30° (object boundaries and box creases), else 0;
* image: per-object colour (class colour + jitter) × Lambertian shading (random light) × a floor
  checkerboard (0.5 m tiles) × distance fall-off, plus Gaussian noise: the image carries the
  class (colour), the normals (shading) and the depth (texture gradient, fall-off, perspective).

Used through :class:`SyntheticScenesDataset` (the data list) and :class:`LoadSyntheticScene`
(the first transform of the pipeline; renders into the same results keys as
``LoadImageFromFile`` + ``LoadMultiTaskAnnotations``, so the rest of the pipeline is the same).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import DATASETS, TRANSFORMS

from ...core.tasks import MTLConfigError, check_task_names
from ..fields import RESULTS_KEYS, TASKS_KEY, check_dense_tasks
from .base import MultiTaskSegDataset

SYNTHETIC_CLASSES: Tuple[str, ...] = ("floor", "wall", "box", "sphere", "cylinder")
SYNTHETIC_PALETTE = [[140, 100, 64], [204, 199, 178], [191, 51, 38], [51, 89, 204],
                     [51, 166, 77]]
_BASE_RGB = np.asarray(SYNTHETIC_PALETTE, dtype=np.float32) / 255.0
FLOOR, WALL, BOX, SPHERE, CYLINDER = range(5)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


class _Hits:
    """Nearest-hit buffers of the ray caster (flattened pixels)."""

    def __init__(self, n: int) -> None:
        self.t = np.full(n, np.inf)
        self.cls = np.full(n, 255, dtype=np.uint8)
        self.inst = np.full(n, -1, dtype=np.int16)
        self.normal = np.zeros((n, 3))

    def update(self, t: np.ndarray, ok: np.ndarray, cls: int, inst: int, normal) -> np.ndarray:
        win = ok & (t > 1e-6) & (t < self.t)
        self.t[win] = t[win]
        self.cls[win] = cls
        self.inst[win] = inst
        if win.any():
            # a constant vector, or a function of the winning mask giving [k, 3]
            self.normal[win] = normal(win) if callable(normal) else normal
        return win


def render_synthetic_scene(seed: int, index: int, size: Tuple[int, int] = (64, 64),
                           fov: float = 60.0, noise_std: float = 0.02) -> Dict[str, np.ndarray]:
    """Render scene ``index`` of ``seed``.

    Returns a dict of numpy arrays: ``img`` (uint8 [H, W, 3], RGB), ``seg`` (uint8 [H, W]),
    ``depth`` (float32 [H, W], metres), ``normal`` (float32 [H, W, 3]), ``edge`` (uint8 [H, W]),
    ``instance`` (int16 [H, W], −1 = none), and ``pitch`` (float, radians).
    """
    h_img, w_img = int(size[0]), int(size[1])
    rng = np.random.default_rng([int(seed), int(index)])
    # camera
    pitch = math.radians(rng.uniform(5.0, 20.0))
    yaw = math.radians(rng.uniform(-15.0, 15.0))
    cam_h = rng.uniform(1.2, 1.7)
    f = 0.5 * w_img / math.tan(math.radians(fov) / 2)
    u = (np.arange(w_img) + 0.5 - w_img / 2) / f
    v = -(np.arange(h_img) + 0.5 - h_img / 2) / f
    d_cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], -1.0), -1).reshape(-1, 3)
    rot = _rot_y(yaw) @ _rot_x(-pitch)  # camera → world
    d = d_cam @ rot.T  # unnormalised: t along d is the z-depth
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    n_pix = d.shape[0]
    hits = _Hits(n_pix)
    # room
    depth_room = rng.uniform(4.5, 7.5)
    left, right = rng.uniform(1.8, 3.2), rng.uniform(1.8, 3.2)
    wall_h = rng.uniform(2.4, 3.2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -cam_h / dy
        hits.update(t, dy < 0, FLOOR, 0, np.array([0.0, 1.0, 0.0]))
        t = -depth_room / dz
        y, x = cam_h + t * dy, t * dx
        hits.update(t, (dz < 0) & (y >= 0) & (y <= wall_h) & (x >= -left) & (x <= right), WALL,
                    1, np.array([0.0, 0.0, 1.0]))
        for wall_id, (x0, sign) in enumerate(((-left, -1.0), (right, 1.0)), start=2):
            t = x0 / dx
            y, z = cam_h + t * dy, t * dz
            hits.update(t, (sign * dx > 0) & (y >= 0) & (y <= wall_h) & (z >= -depth_room)
                        & (z <= 1.0), WALL, wall_id, np.array([-sign, 0.0, 0.0]))
        inst_cls = [FLOOR, WALL, WALL, WALL]  # class of each instance id
        o = np.array([0.0, cam_h, 0.0])

        footprints = []  # (x, z, radius) of the objects placed so far

        def place(half_x: float, half_z: float) -> Tuple[float, float]:
            """A floor position inside the room, not overlapping earlier objects if possible
            (8 tries; the last one is kept)."""
            radius = math.hypot(half_x, half_z)
            for _ in range(8):
                cx = rng.uniform(-left + half_x + 0.1, right - half_x - 0.1)
                cz = rng.uniform(-depth_room + half_z + 0.1, -1.5 - half_z)
                if all(math.hypot(cx - x, cz - z) > radius + r for x, z, r in footprints):
                    break
            footprints.append((cx, cz, radius))
            return cx, cz

        inv = 1.0 / d
        for _ in range(int(rng.integers(1, 4))):  # boxes (slab test, per axis)
            size3 = rng.uniform([0.3, 0.3, 0.3], [1.0, 1.2, 1.0])
            cx, cz = place(size3[0] / 2, size3[2] / 2)
            lo = np.array([cx - size3[0] / 2, 0.0, cz - size3[2] / 2]) - o
            hi = np.array([cx + size3[0] / 2, size3[1], cz + size3[2] / 2]) - o
            near, far = [], []
            for ax in range(3):
                t1, t2 = lo[ax] * inv[:, ax], hi[ax] * inv[:, ax]
                near.append(np.minimum(t1, t2))
                far.append(np.maximum(t1, t2))
            tmin = np.maximum(np.maximum(near[0], near[1]), near[2])
            tmax = np.minimum(np.minimum(far[0], far[1]), far[2])

            def box_normal(win, near=near):
                axis = np.stack([n[win] for n in near], 1).argmax(1)
                out = np.zeros((axis.size, 3))
                out[np.arange(axis.size), axis] = -np.sign(d[win][np.arange(axis.size), axis])
                return out

            hits.update(tmin, tmax >= tmin, BOX, len(inst_cls), box_normal)
            inst_cls.append(BOX)
        for _ in range(int(rng.integers(0, 3))):  # spheres on the floor
            r = rng.uniform(0.2, 0.5)
            cx, cz = place(r, r)
            c = np.array([cx, r, cz])
            oc = o - c
            a = dx * dx + dy * dy + dz * dz
            b = 2.0 * (d @ oc)
            disc = b * b - 4.0 * a * (oc @ oc - r * r)
            t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
            hits.update(t, disc >= 0, SPHERE, len(inst_cls),
                        lambda win, t=t, c=c, r=r: (o + t[win, None] * d[win] - c) / r)
            inst_cls.append(SPHERE)
        for _ in range(int(rng.integers(0, 2))):  # vertical cylinders on the floor
            r, height = rng.uniform(0.15, 0.35), rng.uniform(0.5, 1.6)
            cx, cz = place(r, r)
            a = dx * dx + dz * dz
            b = -2.0 * (dx * cx + dz * cz)
            disc = b * b - 4.0 * a * (cx * cx + cz * cz - r * r)
            t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
            y = cam_h + t * dy

            def side_normal(win, t=t, cx=cx, cz=cz, r=r):
                tw = t[win]
                return np.stack([(tw * dx[win] - cx) / r, np.zeros(tw.size),
                                 (tw * dz[win] - cz) / r], 1)

            hits.update(t, (disc >= 0) & (y >= 0) & (y <= height), CYLINDER, len(inst_cls),
                        side_normal)
            t = (height - cam_h) / dy
            on_cap = (t * dx - cx) ** 2 + (t * dz - cz) ** 2 <= r * r
            hits.update(t, on_cap, CYLINDER, len(inst_cls), np.array([0.0, 1.0, 0.0]))
            inst_cls.append(CYLINDER)

    valid = np.isfinite(hits.t)
    n_world = hits.normal
    n_cam = n_world @ rot  # world → camera (rot is orthonormal)
    n_cam /= np.maximum(np.linalg.norm(n_cam, axis=1, keepdims=True), 1e-12)
    n_cam[~valid] = 0.0
    depth = np.where(valid, hits.t, 0.0)

    # image: colour × shading × texture × fall-off + noise
    colours = _BASE_RGB[np.asarray(inst_cls)] + rng.normal(0.0, 0.05, (len(inst_cls), 3))
    pix_inst = np.maximum(hits.inst, 0)
    light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(0.2, 0.8)])
    light /= np.linalg.norm(light)
    shade = 0.3 + 0.7 * np.clip(n_world @ light, 0.0, 1.0)
    p = np.array([0.0, cam_h, 0.0]) + np.where(valid, hits.t, 0.0)[:, None] * d
    checker = ((np.floor(p[:, 0] / 0.5) + np.floor(p[:, 2] / 0.5)) % 2).astype(np.float64)
    texture = np.where(hits.cls == FLOOR, 0.85 + 0.15 * checker, 1.0)
    falloff = np.exp(-0.06 * depth)
    rgb = colours[pix_inst] * (shade * texture * falloff)[:, None]
    rgb[~valid] = (0.05, 0.05, 0.08)
    rgb = rgb + rng.normal(0.0, noise_std, rgb.shape)
    img = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(h_img, w_img, 3)

    inst_map = hits.inst.reshape(h_img, w_img)
    nrm = n_cam.reshape(h_img, w_img, 3)
    edge = np.zeros((h_img, w_img), dtype=bool)
    cos30 = math.cos(math.radians(30.0))
    for axis in (0, 1):
        a_sl = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
        b_sl = (slice(None, -1), slice(None)) if axis == 0 else (slice(None), slice(None, -1))
        both = (inst_map[a_sl] >= 0) & (inst_map[b_sl] >= 0)
        diff = (inst_map[a_sl] != inst_map[b_sl]) | (
            both & ((nrm[a_sl] * nrm[b_sl]).sum(-1) < cos30))
        edge[a_sl] |= diff
        edge[b_sl] |= diff
    return dict(img=img, seg=hits.cls.reshape(h_img, w_img),
                depth=depth.reshape(h_img, w_img).astype(np.float32),
                normal=nrm.astype(np.float32), edge=edge.astype(np.uint8),
                instance=inst_map, pitch=pitch)


@TRANSFORMS.register_module()
class LoadSyntheticScene(BaseTransform):
    """Render a :class:`SyntheticScenesDataset` sample into the results dict.

    Required keys: ``scene_seed``, ``scene_idx``, ``scene_size``; optional ``scene_cfg``
    (``fov``, ``noise_std``), ``mtl_tasks``. Adds ``img`` (uint8 BGR, like
    ``LoadImageFromFile``), ``img_shape``, ``ori_shape`` and, for each task in ``tasks`` ∩
    ``mtl_tasks``, its key of ``fields.RESULTS_KEYS`` (appended to ``seg_fields``); sets
    ``mtl_tasks`` to those tasks.

    Args:
        tasks: tasks to render (default: all of the sample's ``mtl_tasks``).
        to_float32: as ``LoadImageFromFile``.
    """

    def __init__(self, tasks: Optional[Sequence[str]] = None, to_float32: bool = False) -> None:
        super().__init__()
        key = "LoadSyntheticScene.tasks"
        self.tasks = None if tasks is None else check_dense_tasks(check_task_names(tasks, key),
                                                                  key)
        self.to_float32 = to_float32

    def transform(self, results: dict) -> dict:
        scene = render_synthetic_scene(results["scene_seed"], results["scene_idx"],
                                       tuple(results["scene_size"]),
                                       **dict(results.get("scene_cfg") or {}))
        img = np.ascontiguousarray(scene["img"][..., ::-1])  # RGB → BGR
        if self.to_float32:
            img = img.astype(np.float32)
        results["img"] = img
        results["img_shape"] = img.shape[:2]
        results["ori_shape"] = img.shape[:2]
        annotated = tuple(results.get(TASKS_KEY, ("seg", "depth", "normal", "edge")))
        tasks = tuple(t for t in annotated if self.tasks is None or t in self.tasks)
        fields = results.setdefault("seg_fields", [])
        for task in tasks:
            key = RESULTS_KEYS[task]
            results[key] = scene[task]
            if key not in fields:
                fields.append(key)
        results[TASKS_KEY] = tasks
        return results

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(tasks={self.tasks}, to_float32={self.to_float32})"


@DATASETS.register_module()
class SyntheticScenesDataset(MultiTaskSegDataset):
    """``num_samples`` procedural scenes (see module docstring); needs no files.

    Args:
        num_samples: dataset length.
        seed: scene ``i`` is a deterministic function of ``(seed, i)``; use another seed for a
            validation set.
        img_size: ``(H, W)`` of images and maps (default ``(64, 64)``).
        tasks: subset of ``('seg', 'depth', 'normal', 'edge')``.
        fov: horizontal field of view in degrees.
        noise_std: image noise (fraction of full scale).
        **kwargs: ``BaseSegDataset`` arguments (``pipeline``, ``test_mode``, ``metainfo``,
            ``indices``, ...). The pipeline starts with ``dict(type='LoadSyntheticScene')``.
    """

    METAINFO = dict(classes=SYNTHETIC_CLASSES, palette=SYNTHETIC_PALETTE)

    def __init__(self, num_samples: int = 128, seed: int = 0,
                 img_size: Sequence[int] = (64, 64),
                 tasks: Sequence[str] = ("seg", "depth", "normal"),
                 fov: float = 60.0, noise_std: float = 0.02, **kwargs) -> None:
        name = type(self).__name__
        if not (isinstance(num_samples, int) and num_samples > 0):
            raise MTLConfigError(f"{name}.num_samples={num_samples!r}: expected a positive int")
        if not (isinstance(seed, int) and seed >= 0):
            raise MTLConfigError(f"{name}.seed={seed!r}: expected a non-negative int")
        img_size = tuple(int(s) for s in img_size)
        if len(img_size) != 2 or min(img_size) < 2:
            raise MTLConfigError(f"{name}.img_size={img_size!r}: expected (H, W), both >= 2")
        if not 1.0 <= float(fov) <= 150.0:
            raise MTLConfigError(f"{name}.fov={fov!r}: expected degrees in [1, 150]")
        self.num_samples, self.seed, self.img_size = num_samples, seed, img_size
        self.scene_cfg = dict(fov=float(fov), noise_std=float(noise_std))
        kwargs.pop("check_files", None)
        super().__init__(tasks=tasks, data_prefix=dict(img_path=""), check_files=False, **kwargs)

    def load_data_list(self):
        return [dict(img_path=f"synthetic/seed_{self.seed}/{i:06d}", scene_seed=self.seed,
                     scene_idx=i, scene_size=self.img_size, scene_cfg=dict(self.scene_cfg),
                     label_map=None, reduce_zero_label=False, seg_fields=[],
                     **{TASKS_KEY: self.tasks})
                for i in range(self.num_samples)]


__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_PALETTE", "render_synthetic_scene",
           "LoadSyntheticScene", "SyntheticScenesDataset"]
