"""surrogate_client.torch's deferred fetch (``fetch="step"``, the default) against a real server: one
request per training step, gradients and losses bit for bit those of the service's own product
(``fetch="call"``) and of local training, and nothing held past its use."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
snn = pytest.importorskip("snntorch")

from helpers import torch_local_spike  # noqa: E402

from surrogate_client import TransportError  # noqa: E402

pytestmark = pytest.mark.e2e


def spike_function(*args, **kwargs):  # imported when a test runs (see test_torch.py)
    from surrogate_client.torch import spike_function as made

    return made(*args, **kwargs)


def _pq_alpha_1(x):
    """alpha - alpha**2 |x| inside |x| <= 1/alpha, else 0, for alpha = 1."""
    ax = x.abs()
    return torch.where(ax > 1.0, torch.zeros_like(x), 1.0 - ax)


local_pq = torch_local_spike(_pq_alpha_1)


def _train(spike_grad, steps: int = 4, time_steps: int = 6, counter=None):
    """A two-layer snnTorch network (12-20-4) trained ``steps`` Adam steps: the losses, the final
    parameters and the /v1/grad requests of each step."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(12, 20), torch.nn.Linear(20, 4)
    with torch.no_grad():
        fc2.weight.mul_(3.0)  # the output layer spikes from the start
    lif1, lif2 = snn.Leaky(beta=0.9, spike_grad=spike_grad), snn.Leaky(beta=0.9, spike_grad=spike_grad)
    params = [*fc1.parameters(), *fc2.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    losses, requests = [], []
    for _ in range(steps):
        inputs = (torch.rand(time_steps, 16, 12, generator=gen) < 0.4).float() * 2.0
        targets = torch.randint(0, 4, (16,), generator=gen)
        start = counter.count() if counter else 0
        mem1, mem2 = lif1.init_leaky(), lif2.init_leaky()
        counts = 0
        for x_t in inputs:
            spk1, mem1 = lif1(fc1(x_t), mem1)
            spk2, mem2 = lif2(fc2(spk1), mem2)
            counts = counts + spk2
        loss = torch.nn.functional.cross_entropy(counts, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        requests.append(counter.count() - start if counter else 0)
    return losses, [p.detach().clone() for p in params], requests


def test_training_losses_identical_in_every_mode_and_one_request_per_step(counted):
    c, transport = counted
    local = _train(local_pq)
    step = _train(spike_function(c, "piecewise_quadratic", alpha=1.0), counter=transport)
    call = _train(spike_function(c, "piecewise_quadratic", fetch="call", alpha=1.0), counter=transport)
    assert step[0] == local[0] == call[0]  # every step's loss, exactly
    for a, b, d in zip(local[1], step[1], call[1], strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, d)
    assert step[2] == [1, 1, 1, 1]  # 2 spiking layers x 6 time steps: one request per training step
    assert call[2] == [12, 12, 12, 12]  # one per layer per time step
    assert len(set(local[0])) > 1  # it trains


CASES = [
    ("piecewise_quadratic", {"alpha": 2.0}),
    ("sigmoid", {"alpha": 4.0}),
    ("gaussian_grad", {"sigma": 0.5, "alpha": 0.5}),
]


@pytest.mark.parametrize(("surrogate", "params"), CASES, ids=[s for s, _ in CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["float16", "bfloat16", "float32", "float64"])
def test_gradient_is_the_services_product_bit_for_bit(client, surrogate, params, dtype):
    """x.grad equals the service's own ``cotangent * g'(x)`` (its vjp) in every dtype, element for element."""
    gen = torch.Generator().manual_seed(3)
    edges = torch.tensor([0.0, -0.0, 0.5, -0.5, 0.25, 1e-3, -1e-3, 3.0, -3.0], dtype=torch.float64)
    x0 = torch.cat([edges, 1.5 * torch.randn(500, generator=gen, dtype=torch.float64)]).to(dtype)
    ct = torch.cat([torch.tensor([1e4, -1e-4]), torch.randn(507, generator=gen)]).to(dtype)
    fn = spike_function(client, surrogate, **params)
    x = x0.clone().requires_grad_(True)
    (fn(x) * ct).sum().backward()
    host = (lambda t: t.float().numpy()) if dtype == torch.bfloat16 else (lambda t: t.numpy())
    name = str(dtype).removeprefix("torch.")
    expected = client.grad(host(x0), cotangent=host(ct), surrogate=surrogate, dtype=name, **params)
    expected = torch.from_numpy(np.asarray(expected, np.float32 if dtype == torch.bfloat16 else None)).to(dtype)
    assert x.grad.dtype == dtype
    assert int((x.grad != 0).sum()) > 100
    assert torch.equal(x.grad.view(torch.int16 if dtype.itemsize == 2 else torch.int64 if dtype.itemsize == 8
                                   else torch.int32),
                       expected.view(torch.int16 if dtype.itemsize == 2 else torch.int64 if dtype.itemsize == 8
                                     else torch.int32))


def test_one_request_per_dtype_and_per_shape_with_array_parameters(counted):
    c, transport = counted
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 10, generator=gen, dtype=dt).requires_grad_(True)
          for dt in (torch.float32, torch.float64, torch.float32, torch.float64)]
    ys = [torch.randn(3, 10, generator=gen).requires_grad_(True)]
    scalar = spike_function(c, "piecewise_quadratic", alpha=1.0)
    start = transport.count()
    sum(scalar(x).sum() for x in xs).backward()
    assert transport.count() - start == 2  # float32 and float64
    for x in xs:
        expected = torch.from_numpy(c.grad(x.detach().numpy(), alpha=1.0, dtype=str(x.dtype)[6:]))
        assert torch.equal(x.grad, expected)
    alpha = torch.linspace(0.5, 2.0, 10)
    per_neuron = spike_function(c, "piecewise_quadratic", alpha=alpha)
    x1, x2 = (torch.randn(4, 10, generator=gen).requires_grad_(True) for _ in range(2))
    start = transport.count()
    (per_neuron(x1).sum() + per_neuron(x2).sum() + per_neuron(ys[0]).sum()).backward()
    assert transport.count() - start == 2  # shapes (4, 10) stacked, and (3, 10)
    for x in (x1, x2, ys[0]):
        assert torch.equal(x.grad, torch.from_numpy(c.grad(x.detach().numpy(), alpha=alpha.numpy(), dtype="float32")))


@pytest.mark.parametrize(("sizes", "requests"), [((50, 50, 50, 50), 2), ((50, 51), 2), ((100,), 1), ((250, 10), 2)])
def test_requests_hold_at_most_fetch_elements(counted, monkeypatch, sizes, requests):
    """At most FETCH_ELEMENTS (here 100) elements per request: exactly 100 is one request, 101 two;
    one x larger than that is a request of its own."""
    import surrogate_client.torch as adapter

    monkeypatch.setattr(adapter, "FETCH_ELEMENTS", 100)
    c, transport = counted
    fn = spike_function(c, "sigmoid", alpha=4.0)
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(n, generator=gen).requires_grad_(True) for n in sizes]
    start = transport.count()
    sum(fn(x).sum() for x in xs).backward()
    assert transport.count() - start == requests
    for x in xs:
        assert torch.equal(x.grad, torch.from_numpy(c.grad(x.detach().numpy(), surrogate="sigmoid", alpha=4.0)))


def test_no_record_without_autograd(client):
    c = client
    fn = spike_function(c, alpha=1.0)
    x = torch.randn(8)
    fn(x)  # x needs no gradient
    with torch.no_grad():
        fn(x.requires_grad_(True))
    assert len(fn._pending) == 0


def test_graphs_never_backpropagated_hold_nothing(counted):
    c, transport = counted
    fn = spike_function(c, alpha=1.0)
    w = torch.randn(64, 64, requires_grad=True)
    start = transport.count()
    for _ in range(300):  # forward passes whose graphs are dropped unused (an evaluation with grad on)
        fn(torch.randn(32, 64) @ w).sum()
    gc.collect()
    assert len(fn._pending) == 0
    assert len(fn._held) == 0
    assert transport.count() == start  # and nothing was fetched


def test_kept_graphs_let_go_of_their_gradients_at_the_next_step(counted):
    """A step's forward pass records an x that its loss does not use, and the caller keeps that graph:
    the backward pass fetches it with the rest, and the next step's first forward lets it go."""
    c, transport = counted
    fn = spike_function(c, alpha=1.0)
    w = torch.randn(16, 16, requires_grad=True)
    kept = []
    for step in range(5):
        inputs = torch.randn(8, 16)
        side = fn(inputs @ w)  # recorded, never backpropagated, kept by the caller
        kept.append(side)
        loss = fn(inputs @ w * 0.5).sum()
        if step:
            assert len(fn._held) == 0  # the previous step's unused g'(x) was let go by this forward pass
        loss.backward()
        assert len(fn._held) == 1  # this step's unused g'(x), until the next step
        assert len(fn._pending) == 0
    x = torch.randn(8, 16, requires_grad=True)
    start = transport.count()
    fn(x).sum().backward()
    # a kept graph backpropagated later still gets the right gradient (fetched for it alone)
    w.grad = None
    kept[0].sum().backward()
    assert transport.count() - start == 2
    assert w.grad is not None
    assert w.grad.abs().sum() > 0


def test_retained_graph_backpropagated_twice(counted):
    c, transport = counted
    fn = spike_function(c, alpha=1.0)
    x = torch.randn(4, 25, requires_grad=True)
    h = x * 1.0
    loss = (fn(h) + fn(2 * h)).sum()
    start = transport.count()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    assert transport.count() - start == 1
    loss.backward()  # g'(x) was dropped once used: fetched again, for each backward call
    assert transport.count() - start == 3
    assert torch.equal(x.grad, first + first)
    expected = torch.from_numpy(c.grad(x.detach().numpy(), alpha=1.0) + 2 * c.grad(2 * x.detach().numpy(), alpha=1.0))
    torch.testing.assert_close(first, expected, rtol=0, atol=0)


def test_a_failed_fetch_raises_and_the_next_backward_fetches_again(counted):
    c, transport = counted
    fn = spike_function(c, alpha=1.0)
    x = torch.randn(3, 7, requires_grad=True)
    loss = (fn(x) + fn(x + 0.25)).sum()
    transport.down = True
    with pytest.raises(TransportError):
        loss.backward(retain_graph=True)
    transport.down = False
    start = transport.count()
    loss.backward()
    assert transport.count() - start == 1  # both x's, still pending, in one request
    expected = c.grad(x.detach().numpy(), alpha=1.0) + c.grad(x.detach().numpy() + np.float32(0.25), alpha=1.0)
    assert torch.equal(x.grad, torch.from_numpy(expected))


def test_fetch_is_checked(client):
    with pytest.raises(ValueError, match="fetch"):
        spike_function(client, fetch="layer")
    assert "fetch='call'" in repr(spike_function(client, fetch="call"))
    assert "fetch" not in repr(spike_function(client))


def test_infinite_and_nan_inputs(client):
    fn = spike_function(client, alpha=1.0)
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.5], requires_grad=True)
    fn(x).sum().backward()
    expected = client.grad(x.detach().numpy(), alpha=1.0)
    np.testing.assert_array_equal(x.grad.numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["float16", "bfloat16", "float32", "float64"])
def test_forward_spike_of_every_kind_of_number(client, dtype):
    """The spike of random bit patterns (NaNs of both signs, infinities, subnormals, zeros), strided
    too, against NumPy: 1 where the sign bit is clear or x is a zero, never for NaN."""
    fn = spike_function(client, alpha=1.0)
    itype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    info = torch.iinfo(itype)
    bits = torch.randint(info.min, info.max, (4096,), generator=torch.Generator().manual_seed(8), dtype=itype)
    edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-310, -1e-310, math.inf, -math.inf, math.nan, -math.nan],
                         dtype=torch.float64).to(dtype)
    x = torch.cat([edges, bits.view(dtype)])
    for sample in (x, x[::3], x[10:].reshape(64, 64).t()):
        v = sample.double().numpy()  # every value exactly
        expected = (~np.isnan(v) & (~np.signbit(v) | (v == 0))).astype(np.float64)
        for arg in (sample, sample.clone().requires_grad_(True)):  # as it is (strided), and recorded
            y = fn(arg)
            assert y.dtype == dtype
            np.testing.assert_array_equal(y.detach().double().numpy(), expected)


def test_zero_dimensional_and_strided_inputs_in_one_fetch(counted):
    c, transport = counted
    fn = spike_function(c, alpha=1.0)
    base = torch.linspace(-1.5, 1.5, 24, dtype=torch.float64)
    scalar = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    strided = base.clone().reshape(4, 6).t().requires_grad_(True)  # a transposed (non-contiguous) x
    start = transport.count()
    (fn(scalar) * 3.0 + (fn(strided) * torch.arange(24.0, dtype=torch.float64).reshape(6, 4)).sum()).backward()
    assert transport.count() - start == 1
    assert scalar.grad.shape == ()
    assert scalar.grad.item() == 3.0 * float(c.grad(0.25, alpha=1.0, dtype="float64"))
    expected = torch.arange(24.0, dtype=torch.float64).reshape(6, 4) * torch.from_numpy(
        c.grad(strided.detach().numpy(), alpha=1.0, dtype="float64"))
    assert torch.equal(strided.grad, expected)
