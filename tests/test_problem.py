import pytest
import torch

import bilevel as bl
from bilevel.problem import check_scalar_loss, check_variables

F64 = torch.float64


def _f(x, y, b):
    return ((y["y"] - x["x"]) ** 2).sum() + (x["x"] ** 2).sum()


def _g(x, y, b):
    return 0.5 * (y["y"] ** 2).sum() - (x["x"] * y["y"]).sum()


def _xy(n=3):
    return {"x": torch.linspace(-1, 1, n, dtype=F64)}, {"y": torch.linspace(0, 2, n, dtype=F64)}


def test_validate_returns_f_and_g_at_the_point():
    x, y = _xy()
    fv, gv = bl.Problem(upper=_f, lower=_g).validate(x, y)
    assert torch.equal(fv, _f(x, y, None).detach())
    assert torch.equal(gv, _g(x, y, None).detach())
    assert not fv.requires_grad and not gv.requires_grad


def test_non_scalar_loss_is_a_value_error_naming_the_shape_and_the_reduction():
    bad = bl.Problem(upper=lambda x, y, b: (y["y"] - x["x"]) ** 2, lower=_g)
    with pytest.raises(ValueError, match=r"upper objective.*shape \(3,\)") as info:
        bad.validate(*_xy())
    assert ".mean()" in str(info.value) and ".sum()" in str(info.value)
    bad_lower = bl.Problem(upper=_f, lower=lambda x, y, b: (y["y"] ** 2).reshape(1, 3))
    with pytest.raises(ValueError, match=r"lower objective.*shape \(1, 3\)"):
        bad_lower.validate(*_xy())


def test_non_tensor_loss_is_a_type_error():
    bad = bl.Problem(upper=lambda x, y, b: _f(x, y, b).detach().item(), lower=_g)
    with pytest.raises(TypeError, match="upper objective returned a float, not a tensor"):
        bad.validate(*_xy())


def test_integer_loss_and_nonfinite_loss_are_rejected():
    with pytest.raises(TypeError, match=r"dtype torch\.int64"):
        check_scalar_loss("upper", torch.tensor(3))
    with pytest.raises(ValueError, match="lower objective is nan"):
        check_scalar_loss("lower", torch.tensor(float("nan"), dtype=F64))


def test_integer_variables_are_a_type_error_naming_the_leaf():
    x, y = _xy()
    problem = bl.Problem(upper=_f, lower=_g)
    with pytest.raises(TypeError, match=r"y\['y'\] has dtype torch.int64"):
        problem.validate(x, {"y": torch.arange(3)})
    with pytest.raises(TypeError, match=r"x\['k'\] has dtype torch.int32"):
        problem.validate({**x, "k": torch.zeros(2, dtype=torch.int32)}, y)


def test_non_tensor_leaf_and_empty_or_none_variables_are_rejected():
    with pytest.raises(TypeError, match=r"x\['a'\] is a list, not a tensor|x\['a'\]\[0\] is a float"):
        check_variables("x", {"a": [1.0, 2.0]})
    with pytest.raises(ValueError, match="holds no tensor"):
        check_variables("y", {})
    with pytest.raises(TypeError, match="x is None"):
        check_variables("x", None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["x", "y"])
def test_nan_or_inf_in_start_point_is_a_value_error_naming_the_leaf(which, bad):
    x, y = _xy()
    point = {"x": x, "y": y}
    extra = torch.tensor([1.0, bad, 2.0, bad], dtype=F64)
    point[which] = {**point[which], "extra": extra}
    with pytest.raises(ValueError, match=rf"{which}\['extra'\] contains 2 NaN/Inf entries"):
        bl.Problem(upper=_f, lower=_g).validate(point["x"], point["y"])


def test_structure_mismatch_reraises_the_error_type_with_the_structure_summary():
    x, y = _xy()
    problem = bl.Problem(upper=_f, lower=_g)
    with pytest.raises(KeyError) as info:
        problem.validate({"w": x["x"]}, y)
    message = str(info.value)
    assert "upper objective" in message and "structure" in message
    assert "x = {['w']: (3,) float64}" in message and "y = {['y']: (3,) float64}" in message
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RuntimeError, match=r"upper objective.*y = \{\['y'\]: \(5,\) float64\}"):
        problem.validate(x, {"y": torch.zeros(5, dtype=F64)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put tensors on two devices")
def test_tensors_on_mixed_devices_are_rejected():
    x, y = _xy()
    with pytest.raises(ValueError, match="several devices"):
        check_variables("x", {"a": x["x"], "b": x["x"].cuda()})
    with pytest.raises(ValueError, match="same device"):
        bl.Problem(upper=_f, lower=_g).validate(x, {"y": y["y"].cuda()})


def test_lower_objective_using_a_captured_parameter_instead_of_y_is_a_value_error():
    w = torch.ones(3, dtype=F64, requires_grad=True)
    problem = bl.Problem(upper=_f, lower=lambda x, y, b: ((w - x["x"]) ** 2).sum())
    with pytest.raises(ValueError, match="does not depend on y"):
        problem.validate(*_xy())


def test_lower_objective_of_x_only_is_a_value_error():
    problem = bl.Problem(upper=_f, lower=lambda x, y, b: (x["x"] ** 2).sum())
    with pytest.raises(ValueError, match="does not depend on y"):
        problem.validate(*_xy())


def test_lower_objective_ignoring_one_of_several_lower_variables_is_allowed():
    x, y = _xy()
    problem = bl.Problem(upper=_f, lower=_g)
    problem.validate(x, {**y, "unused": torch.zeros(2, dtype=F64)})


@pytest.mark.parametrize("which", ["upper", "lower"])
def test_non_callable_objective_is_a_type_error(which):
    kwargs = {"upper": _f, "lower": _g, which: 3.0}
    with pytest.raises(TypeError, match=rf"Problem\({which}=...\) must be a callable.*got float"):
        bl.Problem(**kwargs)


def test_missing_start_point_without_default_is_a_value_error():
    problem = bl.Problem(upper=_f, lower=_g, name="mine")
    x, y = _xy()
    with pytest.raises(ValueError, match="no x0 given and problem 'mine' has no default"):
        problem.initial_point(None, y)
    with pytest.raises(ValueError, match="no x0 and y0 given"):
        problem.initial_point()
    with pytest.raises(ValueError, match="no y0 given"):
        bl.AID().init(problem, x0=x)
    with_default = problem.replace(x_init=x)
    got_x, got_y = with_default.initial_point(None, y)
    assert got_x is x and got_y is y


def test_aggregated_is_the_weighted_sum_of_upper_and_lower():
    x, y = _xy(4)
    problem = bl.Problem(upper=_f, lower=_g)
    for mu in (0.0, 0.3, 0.9, 1.0):
        phi = problem.aggregated(mu)
        expected = mu * _f(x, y, None) + (1 - mu) * _g(x, y, None)
        torch.testing.assert_close(phi(x, y, None), expected, rtol=1e-15, atol=1e-15)
    assert torch.equal(problem.f(x, y), _f(x, y, None)) and torch.equal(problem.g(x, y), _g(x, y, None))


def test_objectives_receive_the_batch():
    seen = []

    def upper(x, y, b):
        seen.append(("f", b))
        return b * (y["y"] ** 2).sum()

    problem = bl.Problem(upper=upper, lower=_g)
    x, y = _xy()
    torch.testing.assert_close(problem.f(x, y, 3.0), 3.0 * (y["y"] ** 2).sum())
    assert seen == [("f", 3.0)]


def _data(gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    return {"xt": r(8, 4), "yt": r(8, 1), "xv": r(6, 4), "yv": r(6, 1)}


def _lower_loss(model, h, b):
    return ((model(b["xt"]) - b["yt"]) ** 2).mean() + h["log_l2"].exp() * (model.params["weight"] ** 2).sum()


def _upper_loss(model, h, b):
    return ((model(b["xv"]) - b["yv"]) ** 2).mean()


def test_from_modules_with_dict_hyper_matches_hand_computation(gen):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1, dtype=F64)
    hyper = {"log_l2": torch.tensor(-1.3, dtype=F64)}
    data = _data(gen)
    problem = bl.Problem.from_modules(net, _upper_loss, _lower_loss, hyper=hyper)
    assert set(problem.y_init) == {"weight", "bias"} and set(problem.x_init) == {"log_l2"}
    W, c = net.weight.detach(), net.bias.detach()
    g_hand = ((data["xt"] @ W.T + c - data["yt"]) ** 2).mean() + torch.exp(torch.tensor(-1.3, dtype=F64)) * (W**2).sum()
    f_hand = ((data["xv"] @ W.T + c - data["yv"]) ** 2).mean()
    torch.testing.assert_close(problem.g(problem.x_init, problem.y_init, data), g_hand, rtol=1e-14, atol=0)
    torch.testing.assert_close(problem.f(problem.x_init, problem.y_init, data), f_hand, rtol=1e-14, atol=0)
    # at another point (x, y) the module's own parameters are ignored
    y = {"weight": torch.randn(1, 4, generator=gen, dtype=F64), "bias": torch.randn(1, generator=gen, dtype=F64)}
    x = {"log_l2": torch.tensor(0.4, dtype=F64)}
    g_other = ((data["xt"] @ y["weight"].T + y["bias"] - data["yt"]) ** 2).mean() + torch.exp(torch.tensor(0.4, dtype=F64)) * (
        y["weight"] ** 2
    ).sum()
    torch.testing.assert_close(problem.g(x, y, data), g_other, rtol=1e-14, atol=0)
    problem.validate(problem.x_init, problem.y_init, data)


def test_from_modules_gradients_flow_to_x_and_y(gen):
    net = torch.nn.Linear(4, 1, dtype=F64)
    problem = bl.Problem.from_modules(net, _upper_loss, _lower_loss, hyper={"log_l2": torch.tensor(0.2, dtype=F64)})
    data = _data(gen)
    gx, gy, _ = bl.Oracles().gradients(problem.lower, problem.x_init, problem.y_init, data)
    W = net.weight.detach()
    torch.testing.assert_close(gx["log_l2"], torch.exp(torch.tensor(0.2, dtype=F64)) * (W**2).sum(), rtol=1e-13, atol=0)
    resid = data["xt"] @ W.T + net.bias.detach() - data["yt"]
    torch.testing.assert_close(gy["bias"], 2 * resid.mean(0), rtol=1e-13, atol=1e-15)


def test_from_modules_initial_points_are_copies(float64_default):
    net = torch.nn.Linear(4, 1)
    assert net.weight.dtype == F64
    hyper = {"log_l2": torch.tensor(0.5, dtype=F64)}
    problem = bl.Problem.from_modules(net, _upper_loss, _lower_loss, hyper=hyper)
    w_before = net.weight.detach().clone()
    problem.y_init["weight"].add_(10.0)
    problem.x_init["log_l2"].add_(1.0)
    assert torch.equal(net.weight.detach(), w_before)
    assert float(hyper["log_l2"]) == 0.5
    with torch.no_grad():
        net.bias.fill_(7.0)
    assert float(problem.y_init["bias"]) != 7.0
    assert not problem.y_init["weight"].requires_grad


class _Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=F64))
        self.register_buffer("offset", torch.full((4,), 0.5, dtype=F64))

    def forward(self, inputs):
        return inputs * self.log_scale.exp() + self.offset


def test_from_modules_with_a_hyper_module(gen):
    net = torch.nn.Linear(4, 1, dtype=F64)
    hyper = _Scale()
    data = _data(gen)

    def lower(model, h, b):
        return ((model(h(b["xt"])) - b["yt"]) ** 2).mean() + 0.1 * (model.params["weight"] ** 2).sum()

    problem = bl.Problem.from_modules(net, _upper_loss, lower, hyper=hyper)
    assert set(problem.x_init) == {"log_scale"}
    x = {"log_scale": torch.tensor([0.0, 0.5, -0.5, 1.0], dtype=F64)}
    W, c = net.weight.detach(), net.bias.detach()
    feats = data["xt"] * x["log_scale"].exp() + 0.5
    expected = ((feats @ W.T + c - data["yt"]) ** 2).mean() + 0.1 * (W**2).sum()
    torch.testing.assert_close(problem.g(x, problem.y_init, data), expected, rtol=1e-14, atol=0)
    problem.x_init["log_scale"].zero_()
    assert float(hyper.log_scale.detach()[0]) == pytest.approx(0.1)


def test_from_modules_rejects_bad_arguments():
    net = torch.nn.Linear(2, 1, dtype=F64)
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        bl.Problem.from_modules(lambda t: t, _upper_loss, _lower_loss, hyper={})
    with pytest.raises(TypeError, match="hyper"):
        bl.Problem.from_modules(net, _upper_loss, _lower_loss, hyper=None)
    with pytest.raises(ValueError, match="no parameters"):
        bl.Problem.from_modules(torch.nn.ReLU(), _upper_loss, _lower_loss, hyper={"a": torch.zeros(1)})


class _BNConvNet(torch.nn.Module):
    """A small ConvNet with BatchNorm (the TorchOpt pitfalls #144, #161)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, dtype=F64)
        self.bn = torch.nn.BatchNorm2d(3, dtype=F64)
        self.head = torch.nn.Linear(3 * 4 * 4, 2, dtype=F64)

    def forward(self, images):
        return self.head(torch.relu(self.bn(self.conv(images))).flatten(1))


def _bn_problem(net):
    def lower(model, h, b):
        return torch.nn.functional.cross_entropy(model(b["xt"]), b["yt"]) + h["log_l2"].exp() * (model.params["head.weight"] ** 2).sum()

    def upper(model, h, b):
        return torch.nn.functional.cross_entropy(model(b["xv"]), b["yv"])

    return bl.Problem.from_modules(net, upper, lower, hyper={"log_l2": torch.tensor(-2.0, dtype=F64)})


def _bn_data(gen):
    return {
        "xt": torch.randn(8, 1, 6, 6, generator=gen, dtype=F64),
        "yt": torch.randint(0, 2, (8,), generator=gen),
        "xv": torch.randn(6, 1, 6, 6, generator=gen, dtype=F64),
        "yv": torch.randint(0, 2, (6,), generator=gen),
    }


def _reference_loss(net, y, images, labels):
    """The loss of a copy of ``net`` holding ``y`` (in the copy's train/eval mode)."""
    import copy

    twin = copy.deepcopy(net)
    with torch.no_grad():
        for name, value in y.items():
            twin.get_parameter(name).copy_(value)
    return torch.nn.functional.cross_entropy(twin(images), labels)


def test_from_modules_batchnorm_follows_train_and_eval_and_never_writes_the_running_statistics(gen):
    net = _BNConvNet()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=F64))
        net.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5], dtype=F64))
    before = {k: b.clone() for k, b in net.named_buffers()}
    problem, data = _bn_problem(net), _bn_data(gen)
    assert set(problem.y_init) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"}
    y = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in problem.y_init.items()}
    train_value = problem.f(problem.x_init, y, data)
    torch.testing.assert_close(train_value, _reference_loss(net, y, data["xv"], data["yv"]), rtol=1e-13, atol=0)
    # torch.func transforms (forward-mode oracles) work in training mode: no in-place update of a buffer
    lin_forward = bl.Oracles(mode="forward").linearize(problem.lower, problem.x_init, y, data, with_grad_x=True)
    lin_reverse = bl.Oracles().linearize(problem.lower, problem.x_init, y, data, with_grad_x=True)
    v = {k: torch.randn(t.shape, generator=gen, dtype=F64) for k, t in y.items()}
    for a, b in zip(bl.tree.leaves(lin_forward.both(v)), bl.tree.leaves(lin_reverse.both(v)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    result = bl.solve(problem, bl.AID(lr_upper=0.1, lr_lower=0.1, lower_steps=2, solver=bl.CG(steps=2)), data=data, max_iters=3)
    assert not torch.equal(result.y["bn.weight"], problem.y_init["bn.weight"])
    for name, buffer in net.named_buffers():  # hundreds of evaluations, the statistics untouched
        assert torch.equal(buffer, before[name]), name
    # eval() after the problem was built: the running statistics are used from then on
    net.eval()
    eval_value = problem.f(problem.x_init, y, data)
    torch.testing.assert_close(eval_value, _reference_loss(net, y, data["xv"], data["yv"]), rtol=1e-13, atol=0)
    assert abs(float(eval_value - train_value)) > 1e-3
    net.train()
    torch.testing.assert_close(problem.f(problem.x_init, y, data), train_value, rtol=0, atol=0)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(4, 3, bias=False, dtype=F64)
        self.dec = torch.nn.Linear(3, 4, bias=True, dtype=F64)
        self.out = torch.nn.Linear(3, 1, bias=False, dtype=F64)
        self.out.weight = torch.nn.Parameter(self.enc.weight[:1].detach().clone())
        self.tied = torch.nn.Linear(4, 3, bias=False, dtype=F64)
        self.tied.weight = self.enc.weight  # one parameter under two names

    def forward(self, inputs):
        return self.dec(self.enc(inputs)) + self.tied(inputs).sum(1, keepdim=True)


def test_from_modules_tied_parameters_are_one_variable(gen):
    net = _Tied()
    data = {"xt": torch.randn(5, 4, generator=gen, dtype=F64)}

    def lower(model, h, b):
        return ((model(b["xt"]) - b["xt"]) ** 2).mean() + h["c"] * sum((p**2).sum() for p in model.params.values())

    problem = bl.Problem.from_modules(net, lower, lower, hyper={"c": torch.tensor(0.01, dtype=F64)})
    assert set(problem.y_init) == {"enc.weight", "dec.weight", "dec.bias", "out.weight"}  # tied.weight is enc.weight
    y = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in problem.y_init.items()}
    W, D, c = y["enc.weight"], y["dec.weight"], y["dec.bias"]
    hand = lambda W: (((data["xt"] @ W.T) @ D.T + c + (data["xt"] @ W.T).sum(1, keepdim=True) - data["xt"]) ** 2).mean()
    value = problem.g(problem.x_init, y, data)
    torch.testing.assert_close(value, hand(W) + 0.01 * sum((p**2).sum() for p in y.values()), rtol=1e-13, atol=0)
    # the gradient of the tied variable sums both uses
    grad_y, _ = bl.Oracles().gradient_y(problem.lower, problem.x_init, y, data)
    W_req = W.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(hand(W_req) + 0.01 * (W_req**2).sum(), W_req)
    torch.testing.assert_close(grad_y["enc.weight"], expected, rtol=1e-12, atol=1e-14)


def test_from_modules_frozen_parameters_stay_out_of_y(gen):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3, dtype=F64), torch.nn.Tanh(), torch.nn.Linear(3, 1, dtype=F64))
    net[0].requires_grad_(False)
    data = _data(gen)
    problem = bl.Problem.from_modules(
        net, _upper_loss, lambda m, h, b: _upper_loss(m, h, b) * h["s"], hyper={"s": torch.tensor(1.0, dtype=F64)}
    )
    assert set(problem.y_init) == {"2.weight", "2.bias"}
    y = {k: v + 0.1 for k, v in problem.y_init.items()}
    hidden = torch.tanh(data["xv"] @ net[0].weight.T + net[0].bias)
    hand = ((hidden @ y["2.weight"].T + y["2.bias"] - data["yv"]) ** 2).mean()
    torch.testing.assert_close(problem.f(problem.x_init, y, data), hand, rtol=1e-13, atol=0)
    grad_y, _ = bl.Oracles().gradient_y(problem.lower, problem.x_init, y, data)
    assert set(grad_y) == {"2.weight", "2.bias"}
    with pytest.raises(ValueError, match=r"the model has only frozen parameters \(requires_grad=False\).*unfreeze"):
        bl.Problem.from_modules(net[0], _upper_loss, _lower_loss, hyper={"s": torch.zeros(())})


def test_meta_tensors_are_rejected_naming_the_leaf_and_the_fix():
    x = {"w": torch.empty(3, device="meta", dtype=F64)}
    with pytest.raises(
        ValueError,
        match=r"^x\['w'\] is on the meta device \(no data\): materialise it, "
        r"e.g. with torch.empty_like\(\.\.\., device='cpu'\) / module.to_empty\(device=\.\.\.\)",
    ):
        check_variables("x", x)
    with pytest.raises(ValueError, match=r"y\['y'\] is on the meta device"):
        bl.Problem(upper=_f, lower=_g).validate(_xy()[0], {"y": torch.empty(3, device="meta", dtype=F64)})


def test_meta_module_parameters_are_rejected_by_from_modules_problems():
    with torch.device("meta"):
        net = torch.nn.Linear(4, 1, dtype=F64)
    problem = bl.Problem.from_modules(
        net,
        lambda m, h, b: m(torch.zeros(1, 4, dtype=F64)).sum(),
        lambda m, h, b: m(torch.zeros(1, 4, dtype=F64)).sum(),
        hyper={"a": torch.zeros((), dtype=F64)},
    )
    with pytest.raises(ValueError, match=r"^y\['weight'\] is on the meta device"):
        bl.GALET().init(problem)


@pytest.mark.parametrize("which", ["upper", "lower"])
def test_objective_indexing_a_missing_batch_says_pass_data(which):
    def indexed(x, y, b):
        return ((y["y"] - b["target"]) ** 2).sum()

    problem = bl.Problem(upper=indexed if which == "upper" else _f, lower=indexed if which == "lower" else _g)
    with pytest.raises(
        TypeError, match=rf"^the {which} objective indexes its batch but data=None was given \(.*NoneType.*\): pass data=\.\.\. to solve"
    ) as info:
        problem.validate(*_xy())
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match=rf"the {which} objective indexes its batch but data=None was given"):
        bl.solve(problem, bl.AID(), x0=_xy()[0], y0=_xy()[1], max_iters=1)


def test_objective_reading_a_missing_batch_attribute_says_pass_data():
    problem = bl.Problem(upper=lambda x, y, b: (y["y"] * b.weights).sum(), lower=_g)
    with pytest.raises(TypeError, match=r"the upper objective indexes its batch but data=None was given"):
        problem.validate(*_xy())
