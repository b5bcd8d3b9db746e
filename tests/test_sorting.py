"""utils/sorting.py gives torch's results: the same sorted rows, the same top-k sets (tie-free data), best first when
asked, and torch's own answer where a row holds a NaN."""

import pytest
import torch

from utils import sorting


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32])
def test_sort_equals_torch_sort(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 5000, (3, 7, 300), generator=g).to(dtype)
    assert torch.equal(sorting.sort(x), torch.sort(x, dim=-1).values)
    assert torch.equal(sorting.sort(x[:, 2:5, ::2]), torch.sort(x[:, 2:5, ::2], dim=-1).values)  # strided views


@pytest.mark.parametrize("k", [1, 2, 37, 296, 299, 300])
def test_topk_keeps_torch_topk_values_and_order(k):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 300, generator=g)
    x[0, 0, :3] = float("inf")  # forced slots (tied at the cut for k = 1, 2)
    x[1, 1, -5:] = float("-inf")  # unused slots (tied at the cut for k = 296, 299)
    ref_values = torch.sort(torch.topk(x, k, dim=-1).values, -1).values
    for best_first in (False, True):
        values, indices = sorting.topk(x, k, best_first=best_first)
        assert torch.equal(torch.gather(x, -1, indices), values)  # the values are those of the indices
        gaps = torch.sort(indices, -1).values.diff(dim=-1)
        assert bool((gaps >= 1).all())  # no index twice
        if best_first:  # largest first, torch.topk's values exactly
            assert torch.equal(values, torch.flip(ref_values, [-1]))
        else:  # the same multiset of values (the same set of keys up to ties at the cut)
            assert torch.equal(torch.sort(values, -1).values, ref_values)
    untied = x[2:]  # rows without ties: the very same indices as torch.topk
    assert torch.equal(torch.sort(sorting.topk(untied, k)[1], -1).values,
                       torch.sort(torch.topk(untied, k, dim=-1).indices, -1).values)


def test_topk_with_nan_is_torch_topk():
    x = torch.tensor([[0.5, float("nan"), 0.1, 0.9]])
    got, want = sorting.topk(x, 2, best_first=True), torch.topk(x, 2, dim=-1)
    assert torch.equal(got[1], want[1])  # NaN ranks first, as in torch.topk
    assert torch.equal(sorting.sort(x).isnan(), torch.sort(x, -1).values.isnan())


def test_topk_rejects_k_beyond_the_row():
    with pytest.raises(ValueError, match="outside 0 .. 3"):
        sorting.topk(torch.zeros(2, 3), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_stay_on_torch():
    x = torch.randn(3, 100, device="cuda")
    assert torch.equal(sorting.sort(x), torch.sort(x, -1).values)
    assert torch.equal(sorting.topk(x, 5, best_first=True)[1], torch.topk(x, 5, -1)[1])
