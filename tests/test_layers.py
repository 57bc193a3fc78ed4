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


def test_normed_linear_eps_and_init():
    layer = NormedLinear(1024, 300, temperature=10.0)
    assert abs(layer.weight.std().item() - 0.01) < 5e-4
    assert torch.equal(layer.bias, torch.zeros(300))
    x = torch.randn(4, 1024)
    w = layer.weight / (layer.weight.norm(dim=1, keepdim=True) + 1e-6)
    expected = 10.0 * (x / (x.norm(dim=1, keepdim=True) + 1e-6)) @ w.t()
    torch.testing.assert_close(layer(x), expected)
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


def test_normed_conv2d_normalizes_weight_over_input_channels():
    conv = NormedConv2d(4, 2, kernel_size=3, padding=1, temperature=5.0)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = conv.weight / (conv.weight.norm(dim=1, keepdim=True) + 1e-6)
    xn = x / (x.norm(dim=1, keepdim=True) + 1e-6) * 5.0
    torch.testing.assert_close(conv(x), F.conv2d(xn, w, conv.bias, padding=1))
    conv(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(conv.weight.grad).all()
