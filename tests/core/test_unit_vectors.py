"""``unit_vectors`` is ``F.normalize`` (value and gradient) without its slow CPU norm kernel."""
import pytest
import torch
import torch.nn.functional as F

from mtl_plugins.core.losses import normal_cosine, normal_l1
from mtl_plugins.core.unit_vectors import unit_vectors


def _maps(dtype: torch.dtype) -> torch.Tensor:
    """[2, 3, 4, 5] normals with a zero vector, one shorter than eps and one of norm 1e30."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, :, 0, 0] = 0.0
    x[0, :, 1, 1] = torch.tensor([3e-13, -2e-13, 1e-13])
    x[1, :, 2, 3] = torch.tensor([1e30, -2e30, 5e29]) if dtype == torch.float64 else 1e18
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_values_and_gradients_equal_f_normalize(dtype, dim):
    x = _maps(dtype).requires_grad_(True)
    ref = x.detach().clone().requires_grad_(True)
    weight = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ours = unit_vectors(x, dim=dim)
    theirs = F.normalize(ref, p=2, dim=dim, eps=1e-12)
    (ours * weight).sum().backward()
    (theirs * weight).sum().backward()
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs)
    assert torch.isfinite(x.grad).all()
    # the zero vector's gradient is grad / eps (F.normalize's), not 0 * inf = NaN
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_zero_vector_gradient_is_finite_and_is_grad_over_eps():
    x = torch.zeros(1, 3, 1, 1, requires_grad=True)
    unit_vectors(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 1e12))


def test_float16_components_whose_squares_overflow():
    """A float16 component of 300 squares to inf in float16; the sum is taken in float32 and
    the result is float32 (F.normalize's dtype under CUDA autocast, where it is a float32
    op: the losses' sums stay float32)."""
    x = torch.tensor([300.0, -400.0, 0.0]).reshape(1, 3, 1, 1).half()
    out = unit_vectors(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([0.6, -0.8, 0.0]))
    assert unit_vectors(x.bfloat16()).dtype == torch.float32


def test_losses_take_the_unit_prediction_as_before():
    """The normal losses' value and gradient are those of the F.normalize formulation."""
    pred = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(2))
    gt = F.normalize(torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(3)), dim=1)
    gt[:, :, 0] = 0.0  # invalid rows
    for loss, reference in ((normal_l1, _l1_reference), (normal_cosine, _cosine_reference)):
        p = pred.clone().requires_grad_(True)
        q = pred.clone().requires_grad_(True)
        ours = loss(p, gt).mean()
        theirs = reference(q, gt)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(p.grad, q.grad)


def _valid(gt: torch.Tensor) -> torch.Tensor:
    return (gt != 0).any(1, keepdim=True)


def _l1_reference(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    valid = _valid(gt).expand_as(gt)
    n = F.normalize(pred, p=2, dim=1, eps=1e-12)
    return (n - gt).abs()[valid].sum() / valid.sum()


def _cosine_reference(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    valid = _valid(gt)
    cos = (F.normalize(pred, p=2, dim=1, eps=1e-12) * gt).sum(1, keepdim=True)
    return (1.0 - cos)[valid].sum() / valid.sum()


def test_inputs_it_cannot_normalise_are_refused():
    with pytest.raises(TypeError, match="expected a floating-point tensor, got torch.int64"):
        unit_vectors(torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match=r"eps=1e-25: expected eps >= 1e-19"):
        unit_vectors(torch.zeros(1, 3), eps=1e-25)
