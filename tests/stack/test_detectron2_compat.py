"""The detectron2._C placeholder: used only without the real extension, every op raises."""
import sys
import types

import pytest

from mtl_plugins.compat import detectron2_c


def test_placeholder_ops_raise_naming_the_op():
    mod = detectron2_c.PlaceholderModule("detectron2._C")
    with pytest.raises(RuntimeError, match=r"nms_rotated \(rotated boxes"):
        mod.nms_rotated(None, None, 0.5)
    with pytest.raises(RuntimeError, match="use_fast_impl=False"):
        mod.COCOevalAccumulate({}, [])
    with pytest.raises(AttributeError):
        mod.__wrapped__


def test_build_queries_answer_so_upstream_default_setup_works():
    from detectron2.utils.collect_env import collect_env_info

    mod = detectron2_c.PlaceholderModule("detectron2._C")
    assert mod.has_cuda() is False and "placeholder" in mod.get_compiler_version()
    if not detectron2_c.has_real_extension():
        assert "placeholder" in collect_env_info()


def test_finder_serves_only_detectron2_C_and_only_as_last_resort():
    finder = detectron2_c.PlaceholderFinder()
    assert finder.find_spec("detectron2.layers") is None
    assert finder.find_spec("detectron2._C") is not None
    detectron2_c.register_finder()
    detectron2_c.register_finder()
    placeholders = [f for f in sys.meta_path if isinstance(f, detectron2_c.PlaceholderFinder)]
    assert len(placeholders) == 1 and sys.meta_path[-1] is placeholders[0]


def test_real_extension_wins(monkeypatch):
    real = types.ModuleType("detectron2._C")
    monkeypatch.setitem(sys.modules, "detectron2._C", real)
    assert detectron2_c.has_real_extension()


def test_rotated_box_op_through_detectron2_raises_clearly():
    import torch
    from detectron2.layers import rotated_boxes

    if detectron2_c.has_real_extension():
        pytest.skip("a compiled detectron2._C is installed")
    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match="box_iou_rotated"):
        rotated_boxes.pairwise_iou_rotated(boxes, boxes)
