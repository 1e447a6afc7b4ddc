import pytest
import torch

from bilevel import tree as T


def _tree(gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return {"w": r(3, 4), "b": r(4), "s": r(())}


def _flat(tree):
    return torch.cat([t.reshape(-1) for t in T.leaves(tree)])


def _copy(tree):
    return T.tree_map(lambda t: t.clone(), tree)


def _assert_same(a, b):
    assert isinstance(a, dict) and set(a) == set(b)
    for k in b:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        torch.testing.assert_close(a[k], b[k], rtol=1e-14, atol=1e-14)


def _assert_unchanged(tree, original):
    for k in original:
        assert torch.equal(tree[k], original[k])


def test_add_sub_scale_axpy_match_leafwise_computations(gen):
    a, b = _tree(gen), _tree(gen)
    a0, b0 = _copy(a), _copy(b)
    _assert_same(T.add(a, b), {k: a[k] + b[k] for k in a})
    _assert_same(T.sub(a, b), {k: a[k] - b[k] for k in a})
    _assert_same(T.scale(-2.5, a), {k: -2.5 * a[k] for k in a})
    _assert_same(T.scale(torch.tensor(0.75, dtype=torch.float64), a), {k: 0.75 * a[k] for k in a})
    _assert_same(T.axpy(0.3, a, b), {k: b[k] + 0.3 * a[k] for k in a})
    _assert_same(T.axpy(torch.tensor(-1.7, dtype=torch.float64), a, b), {k: b[k] - 1.7 * a[k] for k in a})
    _assert_unchanged(a, a0)
    _assert_unchanged(b, b0)


def test_vdot_sq_norm_norm_match_flattened_vectors(gen):
    a, b = _tree(gen), _tree(gen)
    fa, fb = _flat(a), _flat(b)
    assert T.vdot(a, b).dim() == 0
    torch.testing.assert_close(T.vdot(a, b), fa @ fb, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.sq_norm(a), fa @ fa, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.norm(a), torch.linalg.vector_norm(fa), rtol=1e-14, atol=0)
    assert T.sq_norm(a).dim() == 0 and T.norm(a).dim() == 0


def test_vdot_of_empty_tree_raises():
    with pytest.raises(ValueError, match="empty"):
        T.vdot({}, {})


def test_zeros_like_and_clone_keep_shapes_dtypes_and_detach(gen):
    a = _tree(gen)
    a["f32"] = torch.ones(2, dtype=torch.float32)
    z = T.zeros_like(a)
    for k in a:
        assert z[k].shape == a[k].shape and z[k].dtype == a[k].dtype
        assert torch.count_nonzero(z[k]) == 0
    req = T.tree_map(lambda t: t.detach().requires_grad_(True), a)
    c = T.clone(req)
    for k in a:
        assert torch.equal(c[k], a[k]) and not c[k].requires_grad
        assert c[k].data_ptr() != req[k].data_ptr()
    c["w"].add_(1.0)
    assert torch.equal(req["w"].detach(), a["w"])
    d = T.detach(req)
    assert not d["w"].requires_grad and d["w"].data_ptr() == req["w"].data_ptr()


def test_all_finite_detects_nan_and_inf_in_any_leaf(gen):
    a = _tree(gen)
    assert bool(T.all_finite(a)) is True
    for k, bad in (("b", float("nan")), ("s", float("inf")), ("w", -float("inf"))):
        broken = _copy(a)
        broken[k].view(-1)[0] = bad
        assert bool(T.all_finite(broken)) is False
    single = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    assert bool(T.all_finite(single)) is False
    assert bool(T.all_finite(torch.ones(3, dtype=torch.float64))) is True


def test_operations_on_a_bare_tensor(gen):
    a = torch.randn(5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    a0, b0 = a.clone(), b.clone()
    torch.testing.assert_close(T.add(a, b), a + b, rtol=1e-15, atol=0)
    torch.testing.assert_close(T.sub(a, b), a - b, rtol=1e-15, atol=0)
    torch.testing.assert_close(T.scale(3.0, a), 3.0 * a, rtol=1e-15, atol=0)
    torch.testing.assert_close(T.axpy(2.0, a, b), b + 2.0 * a, rtol=1e-15, atol=0)
    torch.testing.assert_close(T.vdot(a, b), a @ b, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.sq_norm(a), a @ a, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.norm(a), a.norm(), rtol=1e-14, atol=0)
    assert isinstance(T.add(a, b), torch.Tensor)
    assert torch.equal(T.zeros_like(a), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(T.clone(a), a)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_operations_on_nested_dicts_and_lists(gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    a = {"enc": {"w": r(2, 3), "b": r(3)}, "dec": [r(4), r(1, 2)], "t": r(())}
    b = T.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), a)
    a0 = T.clone(a)
    s = T.axpy(-0.5, a, b)
    assert torch.equal(s["enc"]["w"], b["enc"]["w"] - 0.5 * a["enc"]["w"])
    assert isinstance(s["dec"], list) and len(s["dec"]) == 2
    torch.testing.assert_close(s["dec"][1], b["dec"][1] - 0.5 * a["dec"][1], rtol=1e-15, atol=0)
    torch.testing.assert_close(T.vdot(a, b), _flat(a) @ _flat(b), rtol=1e-14, atol=0)
    torch.testing.assert_close(T.sq_norm(a), _flat(a) @ _flat(a), rtol=1e-14, atol=0)
    assert len(T.leaves(a)) == 5
    rebuilt = T.unflatten_like(T.leaves(b), a)
    assert torch.equal(rebuilt["enc"]["b"], b["enc"]["b"]) and torch.equal(rebuilt["dec"][0], b["dec"][0])
    for x, y in zip(T.leaves(a), T.leaves(a0), strict=True):
        assert torch.equal(x, y)


def test_structure_summary_names_keys_shapes_and_dtypes():
    s = T.structure_summary({"w": torch.zeros(2, 3, dtype=torch.float64), "n": torch.zeros(4, dtype=torch.int64)})
    assert "['w']: (2, 3) float64" in s
    assert "['n']: (4,) int64" in s
    assert "<tensor>: (5,) float32" in T.structure_summary(torch.zeros(5))


def test_binary_operations_pair_dict_leaves_by_key_not_by_insertion_order():
    a = {"x": torch.tensor([1.0], dtype=torch.float64), "y": torch.tensor([2.0], dtype=torch.float64)}
    b = {"y": torch.tensor([10.0], dtype=torch.float64), "x": torch.tensor([20.0], dtype=torch.float64)}
    assert float(T.vdot(a, b)) == 1.0 * 20.0 + 2.0 * 10.0
    s = T.add(a, b)
    assert float(s["x"]) == 21.0 and float(s["y"]) == 12.0
    mapped = T.tree_map(lambda p, q: p + q, a, b)  # tree_map already matches keys
    assert float(mapped["x"]) == 21.0


def test_leaf_list_operations_equal_the_tree_operations():
    gen = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen, dtype=torch.float64)}
    b = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen, dtype=torch.float64)}
    la, lb = T.leaves(a), T.leaves(b)
    flat_a, flat_b = torch.cat([t.reshape(-1) for t in la]), torch.cat([t.reshape(-1) for t in lb])
    torch.testing.assert_close(T.vdot_leaves(la, lb), flat_a @ flat_b, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.sq_norm_leaves(la), flat_a @ flat_a, rtol=1e-14, atol=0)
    for c in (-0.25, torch.tensor(-0.25, dtype=torch.float64)):  # Python and tensor scalars
        out = T.axpy_leaves(c, la, lb)
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out]), flat_b - 0.25 * flat_a, rtol=1e-15, atol=0)
        assert all(torch.equal(p, q) for p, q in zip(out, T.leaves(T.axpy(c, a, b)), strict=True))
    with pytest.raises(ValueError, match="empty tree"):
        T.vdot_leaves([], [])


def test_sq_norms_of_several_trees_equal_their_separate_sq_norms():
    """One fused kernel for several trees: each value equals sq_norm of its tree (float64),
    for equal and unequal leaf counts, bare tensors and dicts; an empty tree is refused."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    two = {"W": rand(3, 4), "b": rand(3)}
    other_two = {"W": rand(2, 2), "b": rand(1)}
    bare = rand(5)
    for trees in [(two,), (bare,), (two, other_two), (bare, two, other_two), (bare, bare)]:
        values = T.sq_norms(*trees)
        assert len(values) == len(trees)
        for value, tree in zip(values, trees, strict=True):
            assert value.shape == ()
            expected = sum(float((t * t).sum()) for t in T.leaves(tree))
            assert abs(float(value) - expected) <= 1e-13 * expected
    with pytest.raises(ValueError, match="empty tree"):
        T.sq_norms(two, {})


def test_fused_differences_sums_axpys_equal_the_separate_operations_bit_for_bit():
    """differences / sums / axpys: one kernel for several pairs, each result equal (bit for
    bit) to sub / add / axpy of its pair, in the structure of its first (differences, sums)
    or second (axpys) tree; dict leaves paired by key, bare tensors and nested trees too."""
    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    a, b = {"W": rand(3, 2), "b": rand(2)}, {"b": rand(2), "W": rand(3, 2)}  # other key order
    u, w = rand(4), rand(4)
    n1, n2 = {"p": [rand(2), rand(1)]}, {"p": [rand(2), rand(1)]}
    pairs = ((a, b), (u, w), (n1, n2))
    for fused, single in ((T.differences, T.sub), (T.sums, T.add)):
        for got, (p, q) in zip(fused(*pairs), pairs, strict=True):
            want = single(p, q)
            assert T.leaves(got) != [] and len(T.leaves(got)) == len(T.leaves(want))
            assert all(torch.equal(s, t) for s, t in zip(T.leaves(got), T.leaves(want), strict=True))
            assert type(got) is type(p) and (not isinstance(p, dict) or list(got) == list(p))
    for c in (-0.3, torch.tensor(-0.3, dtype=torch.float64)):
        for got, (p, q) in zip(T.axpys(c, *pairs), pairs, strict=True):
            want = T.axpy(c, p, q)
            assert all(torch.equal(s, t) for s, t in zip(T.leaves(got), T.leaves(want), strict=True))
            assert not isinstance(q, dict) or list(got) == list(q)


def test_sq_norms_of_trees_of_three_or_more_tensors_and_mixed_counts():
    """The reductions for trees of three or more tensors, next to trees of one and two."""
    gen = torch.Generator().manual_seed(1)
    three = _tree(gen)
    two = {"W": torch.randn(2, 3, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen, dtype=torch.float64)}
    bare = torch.randn(4, generator=gen, dtype=torch.float64)
    for trees in [(three,), (three, three), (bare, three, two), (two, three)]:
        for value, tree in zip(T.sq_norms(*trees), trees, strict=True):
            expected = sum(float((t * t).sum()) for t in T.leaves(tree))
            assert value.shape == () and abs(float(value) - expected) <= 1e-13 * expected


def test_scales_equal_scale_of_each_tree_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    trees = (_tree(gen), torch.randn(3, generator=gen, dtype=torch.float64), {"p": [torch.randn(2, generator=gen, dtype=torch.float64)]})
    for c in (0.7, torch.tensor(-1.5, dtype=torch.float64)):
        for got, tree in zip(T.scales(c, *trees), trees, strict=True):
            assert all(torch.equal(s, t) for s, t in zip(T.leaves(got), T.leaves(T.scale(c, tree)), strict=True))
