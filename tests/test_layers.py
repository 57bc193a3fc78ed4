"""NormedLinear / NormedConv2d: temperature-scaled cosine similarity plus bias."""
import torch
import torch.nn.functional as F

from seesaw_ecm.layers import NormedConv2d, NormedLinear


def test_normed_linear_is_scaled_cosine_plus_bias():
    layer = NormedLinear(8, 5, temperature=20.0, eps=0.0).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = 20.0 * F.cosine_similarity(x[:, None, :], layer.weight[None], dim=-1) + layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_normed_linear_init_eps_and_scale_invariance():
    """Weights normal(std 0.01), bias 0; the output depends on x and each weight row only through
    their directions; a zero input row gives the bias (eps keeps it finite) instead of NaN."""
    layer = NormedLinear(1024, 300, temperature=10.0)
    assert abs(layer.weight.std().item() - 0.01) < 5e-4
    assert torch.equal(layer.bias, torch.zeros(300))
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(4, 1024)
    out = layer(x)
    torch.testing.assert_close(layer(7.0 * x), out)
    with torch.no_grad():
        layer.weight[:5] *= 3.0
    torch.testing.assert_close(layer(x), out)
    zero = layer(torch.zeros(2, 1024))
    torch.testing.assert_close(zero, layer.bias.expand(2, -1).detach())
    # each row of x aligned with weight row j scores exactly temperature + b_j there
    aligned = layer(layer.weight[:3].detach() * 5.0)
    torch.testing.assert_close(aligned.diagonal(), 10.0 + layer.bias[:3].detach())
    assert NormedLinear(4, 3, bias=False).bias is None


def test_normed_linear_gradients_flow():
    layer = NormedLinear(6, 4)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 6, requires_grad=True)
    layer(x).square().sum().backward()
    for g in (x.grad, layer.weight.grad, layer.bias.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_normed_conv2d_1x1_is_per_pixel_cosine():
    conv = NormedConv2d(6, 3, temperature=20.0, eps=0.0).double()
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    w = conv.weight[:, :, 0, 0]  # (3, 6)
    cos = F.cosine_similarity(x[:, None], w[None, :, :, None, None], dim=2)  # (2, 3, 4, 5)
    torch.testing.assert_close(conv(x), 20.0 * cos + conv.bias[None, :, None, None])


def test_normed_conv2d_3x3_sums_the_cosines_of_each_kernel_position():
    """A 3x3 kernel normalises its weight per output channel AND per kernel position (over input
    channels), and the input per pixel: the output is temperature x the sum, over the nine kernel
    positions, of cos(input pixel, weight at that position), with zero padding adding 0."""
    conv = NormedConv2d(4, 2, kernel_size=3, padding=1, temperature=5.0, eps=0.0).double()
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    padded = F.pad(x, (1, 1, 1, 1))
    expected = conv.bias[None, :, None, None].expand(1, 2, 6, 6).clone()
    for ky in range(3):
        for kx in range(3):
            window = padded[:, :, ky:ky + 6, kx:kx + 6]  # (1, 4, 6, 6)
            w = conv.weight[:, :, ky, kx]  # (2, 4)
            cos = F.cosine_similarity(window[:, None], w[None, :, :, None, None], dim=2)
            inside = window.abs().sum(dim=1, keepdim=True) > 0  # zero padding contributes 0
            expected = expected + 5.0 * torch.where(inside, cos, torch.zeros_like(cos))
    torch.testing.assert_close(conv(x), expected)
    conv(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(conv.weight.grad).all()
