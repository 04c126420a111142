import math

import pytest
import torch

from projector import build_projector


def test_linear_layout_and_output():
    proj = build_projector("linear", 6, 4)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {"weight": (4, 6), "bias": (4,)}
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(proj(x), x @ proj.weight.T + proj.bias)


def test_mlp2x_gelu_layout_matches_original_release_keys():
    proj = build_projector("mlp2x_gelu", 6, 4)
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {"0.weight": (4, 6), "0.bias": (4,), "2.weight": (4, 4), "2.bias": (4,)}


def test_mlp2x_gelu_uses_exact_erf_gelu():
    torch.manual_seed(0)
    proj = build_projector("mlp2x_gelu", 6, 4)
    x = 3 * torch.randn(5, 6)
    h = x @ proj[0].weight.T + proj[0].bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU, not the tanh approximation
    torch.testing.assert_close(proj(x), h @ proj[2].weight.T + proj[2].bias)
    tanh_gelu = torch.nn.functional.gelu(x @ proj[0].weight.T + proj[0].bias, approximate="tanh")
    assert not torch.allclose(proj(x), tanh_gelu @ proj[2].weight.T + proj[2].bias, atol=1e-6)


def test_unknown_projector_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_projector("mlp3x_relu", 6, 4)
    assert "mlp3x_relu" in str(err.value) and "linear" in str(err.value) and "mlp2x_gelu" in str(err.value)
