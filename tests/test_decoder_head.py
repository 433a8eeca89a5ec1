"""BEV decoder, fuser and map head: shapes, orientation and values against plain references."""

import pytest
import torch
import torch.nn.functional as F

from bridgeta.geometry import BEVGrid
from bridgeta.models.decoder import BEVDecoder, BasicBlock
from bridgeta.models.fuser import ConvFuser
from bridgeta.models.head import BEVGridTransform, MapSegmentationHead

FEATURE_GRID = BEVGrid((-51.2, 51.2, 0.8), (-51.2, 51.2, 0.8))
LABEL_GRID = BEVGrid((-50, 50, 0.5), (-50, 50, 0.5))


def test_bevfusion_decoder_shapes_and_stage_strides():
    decoder = BEVDecoder(80, [(2, 160, 2), (2, 320, 2), (2, 640, 1)], (-1, 0), 256, 2).eval()
    stages = decoder.backbone(torch.randn(1, 80, 128, 128))
    assert [tuple(s.shape[1:]) for s in stages] == [(160, 64, 64), (320, 32, 32), (640, 32, 32)]
    with torch.no_grad():
        assert decoder(torch.randn(1, 80, 128, 128)).shape == (1, 256, 128, 128)
    assert decoder.output_scale == 1.0


def test_basic_block_matches_plain_reference():
    torch.manual_seed(0)
    block = BasicBlock(8, 16, stride=2).eval()
    for bn in (block.bn1, block.bn2, block.downsample[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 10, 10)

    def bn(layer, t):
        return F.batch_norm(t, layer.running_mean, layer.running_var, layer.weight, layer.bias, False)

    main = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    main = bn(block.bn2, F.conv2d(main, block.conv2.weight, padding=1))
    shortcut = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    assert torch.allclose(block(x), F.relu(main + shortcut), atol=1e-5)


def test_grid_transform_preserves_linear_fields_and_orientation():
    transform = BEVGridTransform(FEATURE_GRID, LABEL_GRID)
    x_in = FEATURE_GRID.cell_centers("x")[:, None].expand(FEATURE_GRID.shape)
    y_in = FEATURE_GRID.cell_centers("y")[None, :].expand(FEATURE_GRID.shape)
    out = transform(torch.stack([x_in, y_in])[None])
    # Bilinear resampling reproduces a linear field exactly: each output cell reads its own
    # metric coordinate, so dimension 2 is X (forward) and dimension 3 is Y (left).
    x_out = LABEL_GRID.cell_centers("x")[:, None].expand(LABEL_GRID.shape)
    y_out = LABEL_GRID.cell_centers("y")[None, :].expand(LABEL_GRID.shape)
    assert out.shape == (1, 2, 200, 200)
    assert torch.allclose(out[0, 0], x_out, atol=1e-4)
    assert torch.allclose(out[0, 1], y_out, atol=1e-4)


def test_grid_transform_identity_and_shape_error():
    transform = BEVGridTransform(LABEL_GRID, LABEL_GRID)
    x = torch.randn(2, 3, 200, 200)
    # float32 unnormalisation inside grid_sample leaves ~1e-5 px of jitter; a shifted grid errs by O(1).
    assert torch.allclose(transform(x), x, atol=5e-4)
    with pytest.raises(ValueError, match="expects a \\(200, 200\\) map"):
        transform(torch.randn(1, 3, 100, 100))


def test_head_output_and_split_parts():
    head = MapSegmentationHead(16, FEATURE_GRID, LABEL_GRID, 6).eval()
    decoded = torch.randn(2, 16, 128, 128)
    logits = head(decoded)
    assert logits.shape == (2, 6, 200, 200)
    assert torch.allclose(logits, head.classifier(head.transform(decoded)))


def test_fuser_concatenates_in_order_and_checks_channels():
    fuser = ConvFuser([2, 3], 4).eval()
    camera, lidar = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 8, 8)
    expected = fuser[2](fuser[1](fuser[0](torch.cat([camera, lidar], 1))))
    assert torch.allclose(fuser([camera, lidar]), expected)
    with pytest.raises(ValueError, match="input 1 has 2 channels, expected 3"):
        fuser([camera, camera])


@pytest.mark.parametrize("grids", ["feature_to_label", "label_to_label", "tiny"])
def test_grid_transform_equals_grid_sample_in_value_and_gradient(grids):
    """The separable form against BEVFusion's grid_sample (bilinear, zeros, align_corners=False)."""
    from bridgeta.geometry import BEVGrid

    source, target = {
        "feature_to_label": (FEATURE_GRID, LABEL_GRID),
        "label_to_label": (LABEL_GRID, LABEL_GRID),
        # Output cells past the input's edge: zero padding on one side.
        "tiny": (BEVGrid((-51.2, 51.2, 0.8), (-51.2, 51.2, 0.8)), BEVGrid((-52.0, 50.0, 1.0), (-50.0, 51.5, 0.5))),
    }[grids]
    transform = BEVGridTransform(source, target)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *source.shape, generator=generator, dtype=torch.float64, requires_grad=True)

    def normalised(axis):
        low, high, _ = getattr(source, axis)
        return (target.cell_centers(axis, dtype=torch.float64) - low) / (high - low) * 2 - 1

    gx, gy = torch.meshgrid(normalised("x"), normalised("y"), indexing="ij")
    grid = torch.stack([gy, gx], dim=-1)[None].expand(2, -1, -1, -1)
    reference = torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
    transform = transform.double()
    actual = transform(x)
    assert actual.shape == reference.shape == (2, 3, *target.shape)
    assert torch.allclose(actual, reference, atol=1e-10)
    weights = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad((actual * weights).sum(), x)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
    assert torch.allclose(grad, grad_reference, atol=1e-10)
