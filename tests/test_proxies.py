"""Known answers for the zero-shot proxies (methods/proxies.py): TE-NAS NTK condition number, ZiCo."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bench.api import BenchError
from methods import proxies


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ntk_of_a_linear_model_is_the_input_gram_matrix():
    """f(x) = w.x: J[n] = x_n, so Theta = X X^T exactly and kappa is the Gram's condition number."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 7, generator=g)
    lin = nn.Linear(7, 1, bias=False)
    gram = X.double() @ X.double().T
    K = proxies.ntk_matrix(lin, (X,))
    assert torch.allclose(K, gram, rtol=0, atol=1e-12)
    ev = torch.linalg.eigvalsh(gram)
    assert proxies.ntk_condition(lin, (X,)) == pytest.approx(float(ev[-1] / ev[0]), rel=1e-9)


def test_ntk_known_answers_with_bias_and_several_outputs():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 6, generator=g)
    gram = X.double() @ X.double().T
    # sum of C outputs: d(sum_c w_c.x)/dW = 1 x^T, so Theta = C X X^T
    K = proxies.ntk_matrix(nn.Linear(6, 3, bias=False), (X,))
    assert torch.allclose(K, 3 * gram, atol=1e-10)
    # with the bias among the parameters ("all"): Theta = X X^T + 1; "weights" ignores the bias
    lin = nn.Linear(6, 1, bias=True)
    assert torch.allclose(proxies.ntk_matrix(lin, (X,), params="all"), gram + 1.0, atol=1e-10)
    assert torch.allclose(proxies.ntk_matrix(lin, (X,), params="weights"), gram, atol=1e-10)


def tiny_dit():
    """A 4-block DiT whose adaLN-Zero layers (zero at init) get random values."""
    from bench.models import build

    torch.manual_seed(0)
    net = build("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for m in [b.adaLN_modulation[-1] for b in net.net.blocks] + [net.net.final_layer.adaLN_modulation[-1],
                                                                     net.net.final_layer.linear]:
            m.weight.normal_(0, 0.1)
            m.bias.normal_(0, 0.1)
    return net.net.eval() and net


def test_ntk_on_a_dit_matches_per_sample_backward():
    """The vmap'ed per-sample gradients agree with one backward per sample on the real model."""
    net = tiny_dit()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    K = proxies.ntk_matrix(net.net, (x, t, y), lambda o: o[:, :1])
    params = [p for _, ps in proxies.layer_params(net.net) for _, p in ps]
    J = torch.stack([torch.cat([gr.flatten() for gr in torch.autograd.grad(
        net.net(x[i:i + 1], t[i:i + 1], y[i:i + 1])[:, :1].sum(), params)]).double() for i in range(3)])
    assert torch.allclose(K, J @ J.T, rtol=1e-4, atol=1e-6 * float(K.abs().max()))
    assert all(p.grad is None for p in net.net.parameters())  # proxies never touch .grad


def _two_layer():
    """f(x) = a.x[:, :2] + b.x[:, 2:], both weights 0: each layer's gradient is -2 y x_part."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
            nn.init.zeros_(self.a.weight)
            nn.init.zeros_(self.b.weight)

        def forward(self, x):
            return self.a(x[:, :2]) + self.b(x[:, 2:])

    return Two()


def test_zico_known_answer():
    """Mini-batch 1: x=(1,2 | 2,0), y=1 -> g_a=(-2,-4), g_b=(-4,0); mini-batch 2: x=(3,1 | 2,0),
    y=-1 -> g_a=(6,2), g_b=(4,0). Layer a: mean|g|=(4,3), std g=(4,3) -> log(1+1) = log 2.
    Layer b: (4/4) for the first weight, the second has std 0 and is left out -> log 1 = 0."""
    model = _two_layer()
    batches = [(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), torch.tensor([[1.0]])),
               (torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.tensor([[-1.0]]))]
    loss = lambda b: ((model(b[0]) - b[1]) ** 2).mean()
    z, layers = proxies.zico(model, loss, batches)
    assert z == pytest.approx(math.log(2.0), abs=1e-12) and layers == 2
    # the reference code's running sums (no zero_grad): recorded g_a = (-2,-4), (4,-2)
    # -> mean|g| = (3,3), std = (3,1) -> log(1 + 3); layer b: (-4,0), (0,0) -> (2/2) -> log 1
    za, _ = proxies.zico(model, loss, batches, accumulate=True)
    assert za == pytest.approx(math.log(4.0), abs=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_zico_matches_the_formula_over_three_batches():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(4, 1, bias=False)
    batches = [(torch.randn(5, 4, generator=g), torch.randn(5, 1, generator=g)) for _ in range(3)]
    loss = lambda b: ((lin(b[0]) - b[1]) ** 2).mean()
    G = torch.stack([torch.autograd.grad(loss(b), lin.weight)[0].flatten().double() for b in batches])
    want = math.log(float((G.abs().mean(0) / G.std(0, unbiased=False)).sum()))
    assert proxies.zico(lin, loss, batches)[0] == pytest.approx(want, rel=1e-12)


def test_denoiser_proxies_count_layers_and_follow_ablation():
    net = tiny_dit()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(8, 1, 8, 8, generator=g), torch.arange(8), torch.randn(8, 1, 8, 8, generator=g),
            (torch.arange(8) + 0.5) / 8)
    z, layers = proxies.denoiser_zico(net, *args, splits=2)
    # Conv2d patch embed + 2 timestep-MLP Linears + 5 Linears per block (qkv, proj, fc1, fc2, adaLN) + 2 final
    assert math.isfinite(z) and layers == 1 + 2 + 5 * 4 + 2
    with net.ablate("blocks", [0]):
        assert proxies.denoiser_zico(net, *args, splits=2)[1] == layers - 5
    kappa = proxies.denoiser_ntk_condition(net, *args)
    assert math.isfinite(kappa) and kappa >= 1.0
    with pytest.raises(BenchError):
        proxies.denoiser_zico(net, *args, splits=1)
    with pytest.raises(BenchError):
        proxies.layer_params(net.net, "biases")
