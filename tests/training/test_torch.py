"""surrogate_client.torch against a real server: gradients equal PyTorch autograd of a local
transcription of each formula, snnTorch trains the same with served and local gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
snn = pytest.importorskip("snntorch")

from helpers import torch_local_spike  # noqa: E402

from surrogate_client import NotFound, TransportError, ValidationError  # noqa: E402

pytestmark = pytest.mark.e2e


# surrogate_client.torch is imported when a test runs, not when pytest collects this module: importing a
# submodule binds its name on the package, which tests of the package's public names look at.
def spike_function(*args, **kwargs):
    from surrogate_client.torch import spike_function as made

    return made(*args, **kwargs)


# -- local reference: the formulas of surrogate_core/_surrogates.py (braintools), written in torch --


def _pq(x, alpha):
    ax = x.abs()
    return torch.where(ax > 1 / alpha, torch.zeros_like(x), alpha - alpha**2 * ax)


def _sigmoid(x, alpha):
    s = torch.sigmoid(alpha * x)
    return (1 - s) * s * alpha


def _piecewise_leaky_relu(x, c, w):
    return torch.where(x.abs() > w, c * torch.ones_like(x), 1 / (2 * w) * torch.ones_like(x))


def _gaussian_grad(x, sigma, alpha):
    return alpha * torch.exp(-(x**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)


FORMULAS = {
    "piecewise_quadratic": _pq,
    "sigmoid": _sigmoid,
    "piecewise_leaky_relu": _piecewise_leaky_relu,
    "gaussian_grad": _gaussian_grad,
}


def local_spike(surrogate: str, **params):
    """H(x) forward, ``grad_output * g'(x)`` backward, all in torch (no service)."""
    formula = FORMULAS[surrogate]
    return torch_local_spike(lambda x: formula(x, **{k: torch.as_tensor(v, dtype=x.dtype) for k, v in params.items()}))


CASES = [
    ("piecewise_quadratic", {"alpha": 0.5}),
    ("piecewise_quadratic", {"alpha": 1.0}),
    ("piecewise_quadratic", {"alpha": 2.0}),
    ("sigmoid", {"alpha": 4.0}),
    ("piecewise_leaky_relu", {"c": 0.05, "w": 0.5}),
    ("gaussian_grad", {"sigma": 0.7, "alpha": 0.8}),
]
TOL = {torch.float32: {"rtol": 2e-6, "atol": 1e-7}, torch.float64: {"rtol": 1e-12, "atol": 1e-15}}


def _grads(fn, x, weights):
    x = x.clone().requires_grad_(True)
    (fn(x) * weights).sum().backward()
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("surrogate", "params"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_gradients_equal_local_autograd(client, surrogate, params, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=gen, dtype=dtype) * 1.5
    weights = torch.randn(64, 33, generator=gen, dtype=dtype)  # a non-trivial incoming gradient
    served = _grads(spike_function(client, surrogate, **params), x, weights)
    local = _grads(local_spike(surrogate, **params), x, weights)
    assert served.dtype == dtype
    assert served.shape == x.shape
    assert (served != 0).sum() > 100  # the inputs reach into the surrogate's support
    torch.testing.assert_close(served, local, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_parameters_as_tensors(client, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=gen, dtype=dtype)
    weights = torch.randn(16, 8, generator=gen, dtype=dtype)
    alpha_row = torch.linspace(0.5, 2.0, 8, dtype=dtype)  # one alpha per column: shape (8,)
    alpha_col = torch.linspace(0.5, 3.0, 16, dtype=dtype).reshape(16, 1)  # one per row: (16, 1)
    for alpha in (alpha_row, alpha_col):
        served = _grads(spike_function(client, "piecewise_quadratic", alpha=alpha), x, weights)
        expected = weights * _pq(x, alpha)
        torch.testing.assert_close(served, expected, **TOL[dtype])
    c, w = torch.full((16, 1), 0.02, dtype=dtype), torch.linspace(0.3, 1.5, 8, dtype=dtype)
    served = _grads(spike_function(client, "piecewise_leaky_relu", c=c, w=w), x, weights)
    torch.testing.assert_close(served, weights * _piecewise_leaky_relu(x, c, w), **TOL[dtype])


def test_parameters_that_would_enlarge_x_are_refused(client):
    fn = spike_function(client, "piecewise_quadratic", alpha=torch.ones(3, 1))
    with pytest.raises(ValueError, match="broadcast"):
        fn(torch.zeros(4))


def test_forward_is_the_exact_spike(counted):
    c, transport = counted
    fn = spike_function(c, "sigmoid", alpha=4.0)
    before = list(transport.paths)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, math.inf, -math.inf, math.nan], dtype=dtype)
        y = fn(x)
        assert y.dtype == dtype
        # Python's own comparison of the values x holds (-1e-30 is -0.0 in float16): NaN gives 0
        assert y.tolist() == [1.0 if v >= 0 else 0.0 for v in x.tolist()]
        assert y.tolist()[1:4] == [0.0 if dtype in (torch.float32, torch.float64, torch.bfloat16) else 1.0, 1.0, 1.0]
    assert transport.paths == before  # the forward pass never calls the service


def test_one_request_per_backward_pass(counted):
    c, transport = counted
    fn = spike_function(c, "piecewise_quadratic", alpha=1.0)
    assert transport.paths == ["/v1/surrogates/piecewise_quadratic", "/v1/grad"]  # the checks when made
    x = torch.randn(32, 100, requires_grad=True)
    y = fn(x)
    assert transport.count() == 1
    (y * torch.randn(32, 100)).sum().backward()
    assert transport.count() == 2
    # an expanded (stride 0) incoming gradient travels as one number: same result
    x2 = x.detach().clone().requires_grad_(True)
    fn(x2).sum().backward()
    assert transport.count() == 3
    torch.testing.assert_close(x2.grad, _pq(x2.detach(), torch.tensor(1.0)))
    # no request when nothing needs the gradient
    with torch.no_grad():
        fn(x)
    assert transport.count() == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_gradients(client, dtype):
    x = torch.linspace(-1.2, 1.2, 97, dtype=dtype)
    served = _grads(spike_function(client, "piecewise_quadratic", alpha=2.0), x, torch.ones(97, dtype=dtype))
    assert served.dtype == dtype
    expected = _pq(x.double(), torch.tensor(2.0, dtype=torch.float64))  # x's values, exact formula
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(served.double(), expected, rtol=0, atol=4 * eps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_a_gpu(client):
    x = torch.randn(8, 16, device="cuda")
    served = _grads(spike_function(client, "sigmoid", alpha=4.0), x, torch.ones_like(x))
    assert served.device == x.device
    torch.testing.assert_close(served.cpu(), _sigmoid(x.cpu(), torch.tensor(4.0)))


# -- snnTorch ---------------------------------------------------------------------------------


def _net(spike_grad, seed: int = 0):
    torch.manual_seed(seed)
    fc1, fc2 = torch.nn.Linear(12, 20), torch.nn.Linear(20, 4)
    with torch.no_grad():
        fc2.weight.mul_(3.0)  # strong enough for the output layer to spike from the start
    lif1 = snn.Leaky(beta=0.9, spike_grad=spike_grad)
    lif2 = snn.Leaky(beta=0.9, spike_grad=spike_grad)
    return fc1, fc2, lif1, lif2


def _run(net, inputs):
    fc1, fc2, lif1, lif2 = net
    mem1, mem2 = lif1.init_leaky(), lif2.init_leaky()
    spikes1, spikes2 = [], []
    for xt in inputs:  # inputs: (time, batch, features)
        spk1, mem1 = lif1(fc1(xt), mem1)
        spk2, mem2 = lif2(fc2(spk1), mem2)
        spikes1.append(spk1)
        spikes2.append(spk2)
    return torch.stack(spikes1), torch.stack(spikes2)


def _data(steps: int = 8, batch: int = 16):
    gen = torch.Generator().manual_seed(42)
    inputs = (torch.rand(steps, batch, 12, generator=gen) < 0.4).float() * 2.0
    targets = torch.randint(0, 4, (batch,), generator=gen)
    return inputs, targets


@pytest.mark.parametrize("fetch", ["step", "call"])
def test_snntorch_leaky_with_served_spike_grad(counted, fetch):
    c, transport = counted
    inputs, targets = _data()
    served_net = _net(spike_function(c, "sigmoid", fetch=fetch, alpha=4.0))
    local_net = _net(local_spike("sigmoid", alpha=4.0))
    start = transport.count()
    grads = []
    for net in (served_net, local_net):
        _, spk2 = _run(net, inputs)
        loss = torch.nn.functional.cross_entropy(spk2.sum(0), targets)
        loss.backward()
        grads.append([p.grad for m in net[:2] for p in m.parameters()])
    # fetch="step": one request for the whole backward pass; fetch="call": one per spiking layer per
    # time step (snnTorch's reset uses a detached spike)
    assert transport.count() - start == (1 if fetch == "step" else 2 * len(inputs))
    for g_served, g_local in zip(*grads, strict=True):
        assert g_served.abs().sum() > 0
        torch.testing.assert_close(g_served, g_local, rtol=1e-5, atol=1e-7)


def test_training_steps_served_and_local_agree(client):
    inputs, targets = _data()
    target_rates = torch.nn.functional.one_hot(targets, 4) * 0.6 + 0.2  # a rate code keeps both layers firing
    runs = {}
    for name, grad in (("served", spike_function(client)), ("local", local_spike("piecewise_quadratic", alpha=1.0))):
        net = _net(grad, seed=3)
        params = [p for m in net[:2] for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=0.1)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            spk1, spk2 = _run(net, inputs)
            assert spk1.sum() > 0
            assert spk2.sum() > 0
            loss = torch.nn.functional.mse_loss(spk2.mean(0), target_rates)
            loss.backward()
            assert all(p.grad.abs().sum() > 0 for p in params)  # gradients reach every weight
            opt.step()
            losses.append(loss.item())
        runs[name] = (losses, [p.detach().clone() for p in params])
    assert len(set(runs["served"][0])) > 1  # the weights move: the loss changes
    np.testing.assert_allclose(runs["served"][0], runs["local"][0], rtol=1e-5)
    for p_served, p_local in zip(runs["served"][1], runs["local"][1], strict=True):
        torch.testing.assert_close(p_served, p_local, rtol=1e-5, atol=1e-6)


# -- errors -----------------------------------------------------------------------------------


def test_unknown_surrogate_is_not_found(client):
    with pytest.raises(NotFound) as info:
        spike_function(client, "no_such_surrogate")
    assert info.value.status == 404


def test_bad_parameters_are_refused_when_made(client):
    with pytest.raises(ValidationError) as info:
        spike_function(client, "sigmoid", alpha=-1.0)
    assert info.value.field == "alpha"
    assert info.value.code == "invalid_value"
    with pytest.raises(ValidationError) as info:
        spike_function(client, "piecewise_quadratic", alpha=torch.tensor([1.0, 0.0]))
    assert info.value.field == "alpha"
    with pytest.raises(ValidationError) as info:
        spike_function(client, "sigmoid", alfa=2.0)
    assert info.value.code == "unknown_field"
    assert "alpha" in info.value.message


def test_service_errors_during_backward_are_typed(counted):
    c, transport = counted
    # valid when made (checked in float64), but alpha**2 overflows float16: the service refuses it
    fn = spike_function(c, "piecewise_quadratic", alpha=300.0)
    x = torch.zeros(20, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValidationError) as info:
        fn(x).sum().backward()
    assert info.value.code == "not_representable"
    # the service goes away between the forward and the backward pass
    fn = spike_function(c, "sigmoid", alpha=4.0)
    y = fn(torch.randn(20, requires_grad=True)).sum()
    transport.down = True
    with pytest.raises(TransportError):
        y.backward()
