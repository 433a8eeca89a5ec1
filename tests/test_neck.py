"""GeneralizedLSSFPN: BEVFusion shapes, and values against a hand-written functional reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridgeta.models.neck import GeneralizedLSSFPN


def test_bevfusion_swin_t_shapes():
    neck = GeneralizedLSSFPN([192, 384, 768], 256).eval()
    inputs = [torch.randn(1, 192, 32, 88), torch.randn(1, 384, 16, 44), torch.randn(1, 768, 8, 22)]
    with torch.no_grad():
        outputs = neck(inputs)
    assert [tuple(o.shape) for o in outputs] == [(1, 256, 32, 88), (1, 256, 16, 44)]
    assert neck.out_channels == 256
    # Lateral convs see [level_i, fused coarser]: 384 + 768 at the coarsest fusion, 192 + 256 below.
    assert neck.lateral_convs[1][0].weight.shape == (256, 384 + 768, 1, 1)
    assert neck.lateral_convs[0][0].weight.shape == (256, 192 + 256, 1, 1)


def conv_bn_relu_reference(x: torch.Tensor, block: torch.nn.Sequential) -> torch.Tensor:
    conv, bn, _ = block
    x = F.conv2d(x, conv.weight, padding=conv.kernel_size[0] // 2)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    x = (x - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    return x.clamp(min=0)


def test_values_match_functional_reference():
    torch.manual_seed(0)
    neck = GeneralizedLSSFPN([3, 4, 5], 6)
    with torch.no_grad():
        for module in neck.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    neck.eval()
    level0, level1, level2 = torch.randn(2, 3, 9, 13), torch.randn(2, 4, 5, 7), torch.randn(2, 5, 3, 4)

    with torch.no_grad():
        up2 = F.interpolate(level2, size=(5, 7), mode="bilinear", align_corners=False)
        lateral1 = conv_bn_relu_reference(torch.cat([level1, up2], 1), neck.lateral_convs[1])
        fused1 = conv_bn_relu_reference(lateral1, neck.fpn_convs[1])
        up1 = F.interpolate(fused1, size=(9, 13), mode="bilinear", align_corners=False)
        lateral0 = conv_bn_relu_reference(torch.cat([level0, up1], 1), neck.lateral_convs[0])
        fused0 = conv_bn_relu_reference(lateral0, neck.fpn_convs[0])
        outputs = neck([level0, level1, level2])

    assert len(outputs) == 2
    torch.testing.assert_close(outputs[0], fused0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[1], fused1, rtol=1e-5, atol=1e-5)


def test_rejects_wrong_number_of_levels():
    neck = GeneralizedLSSFPN([8, 16], 4)
    with pytest.raises(ValueError, match="expected 2 input levels"):
        neck([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="at least two"):
        GeneralizedLSSFPN([8], 4)
