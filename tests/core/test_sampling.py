"""Multi-dataset round-robin / ratio batch schedule (paper 000's training loop)."""
import pytest

from mtl_plugins.core.sampling import MultiDatasetSchedule, weighted_round_robin
from mtl_plugins.core.tasks import MTLConfigError


def _dataset(index, offsets):
    return max(d for d, o in enumerate(offsets) if index >= o)


def test_round_robin_order_and_one_dataset_per_batch():
    s = MultiDatasetSchedule([5, 7, 3], batch_size=2, seed=1)
    batches = [s.next_batch() for _ in range(9)]
    datasets = [{_dataset(i, s.offsets) for i in b} for b in batches]
    assert all(len(d) == 1 for d in datasets)
    assert [d.pop() for d in datasets] == [0, 1, 2] * 3


def test_ratio_order_is_smooth_weighted_round_robin():
    assert weighted_round_robin([2, 1]) == [0, 1, 0]
    assert weighted_round_robin([3, 1]) == [0, 0, 1, 0]
    s = MultiDatasetSchedule([4, 4], batch_size=1, ratios=[2, 1])
    assert [s.dataset_of_batch(b) for b in range(6)] == [0, 1, 0, 0, 1, 0]


def test_each_epoch_visits_every_sample_once():
    s = MultiDatasetSchedule([6, 4], batch_size=2, seed=3)
    seen = {0: [], 1: []}
    for _ in range(6):  # 3 batches of each dataset: 6 samples of d0, 6 of d1 (1.5 epochs)
        b = s.next_batch()
        seen[_dataset(b[0], s.offsets)] += b
    assert sorted(seen[0]) == list(range(6))
    first_epoch_d1 = seen[1][:4]
    assert sorted(first_epoch_d1) == [6, 7, 8, 9]


def test_ranks_are_disjoint_and_agree_on_the_dataset_order():
    a = MultiDatasetSchedule([8, 6], batch_size=2, seed=0, rank=0, world_size=2)
    b = MultiDatasetSchedule([8, 6], batch_size=2, seed=0, rank=1, world_size=2)
    ba = [a.next_batch() for _ in range(4)]
    bb = [b.next_batch() for _ in range(4)]
    for x, y in zip(ba, bb):
        assert _dataset(x[0], a.offsets) == _dataset(y[0], b.offsets)
        assert not set(x) & set(y)


def test_state_round_trip_continues_the_stream():
    s = MultiDatasetSchedule([5, 3], batch_size=2, ratios=[1, 2], seed=7)
    for _ in range(5):
        s.next_batch()
    state = s.state_dict()
    expected = [s.next_batch() for _ in range(6)]
    t = MultiDatasetSchedule([5, 3], batch_size=2, ratios=[1, 2], seed=7)
    t.load_state_dict(state)
    assert [t.next_batch() for _ in range(6)] == expected
    with pytest.raises(MTLConfigError, match="checkpoint has dataset sizes"):
        MultiDatasetSchedule([5, 4], batch_size=2, ratios=[1, 2]).load_state_dict(state)


def test_bad_arguments_name_the_key():
    with pytest.raises(MTLConfigError, match=r"sampler.ratios=\[1\]"):
        MultiDatasetSchedule([3, 3], batch_size=1, ratios=[1])
    with pytest.raises(MTLConfigError, match="sampler.batch_size=0"):
        MultiDatasetSchedule([3], batch_size=0)
    with pytest.raises(MTLConfigError, match="non-empty"):
        MultiDatasetSchedule([3, 0], batch_size=1)
