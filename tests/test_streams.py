"""Sample streams: pure in (seed, stream, iteration, draw), block probabilities, passes,
sources (tensors, Dataset, DataLoader) and the one-line errors."""

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import bilevel as bl
from bilevel.streams import Draws, FullDraws, as_draws, lower_batch, upper_batch

F64 = torch.float64


def _streams(n_lower=12, b=4, seed=0, **kw):
    return bl.Streams(
        upper=bl.Stream(torch.arange(8.0), batch_size=4, **kw),
        lower=bl.Stream(torch.arange(100.0, 100.0 + n_lower), batch_size=b, **kw),
        seed=seed,
    )


def test_draws_are_a_pure_function_of_seed_iteration_and_index():
    a, b = _streams(seed=3), _streams(seed=3)
    for k in (0, 1, 17, 10**6):
        for t in range(4):
            assert torch.equal(a.batch_at(k).lower(t), b.batch_at(k).lower(t))
            assert torch.equal(a.batch_at(k).upper(t), b.batch_at(k).upper(t))
    # another seed, another sequence (over many draws: not all equal)
    c = _streams(seed=4)
    assert any(a.batch_at(k).lower_block(0)[0] != c.batch_at(k).lower_block(0)[0] for k in range(50))


def test_draws_within_an_iteration_and_between_streams_are_independent():
    """Pairs (draw 0, draw 1) and (lower, upper) cover the product of the blocks uniformly."""
    streams = bl.Streams(upper=bl.Stream(torch.arange(9.0), batch_size=3), lower=bl.Stream(torch.arange(9.0), batch_size=3), seed=1)
    n = 9000
    pairs = torch.zeros(3, 3)
    cross = torch.zeros(3, 3)
    for k in range(n):
        d = streams.batch_at(k)
        pairs[d.lower_block(0)[0], d.lower_block(1)[0]] += 1
        cross[d.lower_block(0)[0], d.upper_block(0)[0]] += 1
    p = 1 / 9
    bound = 5 * (p * (1 - p) / n) ** 0.5  # 5 standard deviations
    assert ((pairs / n - p).abs() < bound).all(), pairs
    assert ((cross / n - p).abs() < bound).all(), cross


def test_uniform_blocks_are_drawn_with_probability_size_over_n():
    stream = bl.Stream(torch.arange(10.0), batch_size=4)  # blocks of 4, 4, 2
    assert stream.n_blocks == 3 and [stream.weight(i) for i in range(3)] == [0.4, 0.4, 0.2]
    n = 20000
    counts = torch.zeros(3)
    for k in range(n):
        counts[stream.block_at(0, 2, k, 0)] += 1
    for freq, p in zip((counts / n).tolist(), (0.4, 0.4, 0.2), strict=True):
        assert abs(freq - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_shuffle_passes_cover_every_block_once_and_the_first_pass_is_in_order():
    stream = bl.Stream(torch.arange(20.0), batch_size=4, sampling="shuffle", draws=2)  # 5 blocks
    sequence = [stream.block_at(7, 2, k, t) for k in range(10) for t in range(2)]
    assert sequence[:5] == [0, 1, 2, 3, 4]
    for start in (5, 10, 15):
        assert sorted(sequence[start : start + 5]) == [0, 1, 2, 3, 4]
    assert sequence[5:10] != sequence[10:15] or sequence[10:15] != sequence[15:20]


def test_a_stream_that_runs_dry_says_how_many_draws_the_method_needs():
    streams = _streams(sampling="shuffle", draws=2)
    with pytest.raises(IndexError, match=r"ran dry: iteration 3 asked for draw 2 .*draws=3"):
        streams.batch_at(3).lower(2)


def test_batches_are_views_of_the_blocks_and_tuples_for_several_tensors():
    x, y = torch.randn(10, 3), torch.arange(10)
    stream = bl.Stream((x, y), batch_size=4)
    bx, by = stream.take(2)
    assert torch.equal(bx, x[8:10]) and torch.equal(by, y[8:10]) and bx.data_ptr() == x[8].data_ptr()
    assert torch.equal(stream.full()[0], x)


def test_dataset_and_dataloader_sources_give_the_same_batches_as_tensors():
    x, y = torch.randn(12, 2), torch.randn(12)
    from_tensors = bl.Stream((x, y), batch_size=5)
    from_dataset = bl.Stream(TensorDataset(x, y), batch_size=5)
    from_loader = bl.Stream(DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True))
    assert from_loader.batch_size == 5
    for block in range(3):
        a = from_tensors.take(block)
        for other in (from_dataset, from_loader):
            b = other.take(block)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data": torch.arange(5.0), "batch_size": 6}, ValueError, r"Stream\(batch_size=6\) is larger than the data \(5 samples\)"),
        ({"data": torch.arange(5.0)}, ValueError, "batch_size=None"),
        ({"data": (torch.zeros(3), torch.zeros(4)), "batch_size": 1}, ValueError, "share their first dimension"),
        ({"data": [1, 2, 3], "batch_size": 1}, TypeError, "must be a tensor, a tuple of tensors, a torch Dataset"),
        ({"data": torch.arange(5.0), "batch_size": 2, "sampling": "random"}, ValueError, "sampling"),
        ({"data": torch.arange(5.0), "batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_streams_fail_with_one_line(kwargs, error, match):
    with pytest.raises(error, match=match):
        bl.Stream(**kwargs)


def test_an_iterable_dataset_is_refused():
    class Endless(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match="IterableDataset"):
        bl.Stream(Endless(), batch_size=1)


def test_streams_on_another_device_than_the_variables_fail_with_one_line():
    streams = bl.Streams(upper=bl.Stream(torch.zeros(4, device="meta"), batch_size=2), lower=bl.Stream(torch.zeros(4), batch_size=2))
    with pytest.raises(ValueError, match=r"the upper stream's data is on meta but the variables are on cpu"):
        streams.batch_at(0).check_device(torch.device("cpu"))


def test_objectives_resolve_draws_to_their_own_stream():
    streams = _streams()
    draws = streams.batch_at(2)
    assert isinstance(draws, Draws)
    assert torch.equal(upper_batch(draws), draws.upper(0)) and torch.equal(lower_batch(draws), draws.lower(0))
    assert upper_batch("fixed") == "fixed" and lower_batch(None) is None
    full = as_draws(None)
    assert isinstance(full, FullDraws) and full.lower(5) is None and full.lower_blocks == 1


def test_seed_methods_run_on_the_same_streams():
    """BAGDC (one upper and one lower batch per iteration) on the finite-sum quadratic's streams."""
    p = bl.problems.finite_sum_quadratic(n_lower=32, n_upper=32, dim_x=2, dim_y=2, mu=0.5, seed=0)
    result = bl.solve(p, bl.BAGDC(lr_upper=0.05, lr_lower=0.2), data=p.streams(batch_size=8, seed=0), max_iters=200)
    assert float((result.x["x"] - p.x_star["x"]).norm()) < 0.5 * float(p.x_star["x"].norm())
