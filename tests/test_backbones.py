"""ResNet and Swin-T backbones: torchvision / official key layouts, parameter counts, shapes, masks."""

from __future__ import annotations

import pytest
import torch

from bridgeta.models.backbones import build_backbone
from bridgeta.models.backbones.swin import SwinBlock, drop_path, shifted_window_attention_mask

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def torchvision_resnet_keys(blocks_per_stage: tuple[int, ...], bottleneck: bool) -> set[str]:
    """torchvision's ResNet state-dict keys without ``fc``, written out from its structure."""
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in BN_SUFFIXES}
    convs_per_block = 3 if bottleneck else 2
    for stage, num_blocks in enumerate(blocks_per_stage):
        for block in range(num_blocks):
            prefix = f"layer{stage + 1}.{block}."
            for conv in range(1, convs_per_block + 1):
                keys.add(f"{prefix}conv{conv}.weight")
                keys |= {f"{prefix}bn{conv}.{s}" for s in BN_SUFFIXES}
            # Stage 1 of BasicBlock nets keeps 64 channels at stride 1: no projection there.
            if block == 0 and (stage > 0 or bottleneck):
                keys.add(f"{prefix}downsample.0.weight")
                keys |= {f"{prefix}downsample.1.{s}" for s in BN_SUFFIXES}
    return keys


@pytest.mark.parametrize(
    ("name", "blocks", "bottleneck", "torchvision_total"),
    [
        ("resnet18", (2, 2, 2, 2), False, 11_689_512),
        ("resnet34", (3, 4, 6, 3), False, 21_797_672),
        ("resnet50", (3, 4, 6, 3), True, 25_557_032),
    ],
)
def test_resnet_matches_torchvision_layout(name, blocks, bottleneck, torchvision_total):
    model = build_backbone(name, [0, 1, 2, 3])
    final_channels = 2048 if bottleneck else 512
    assert count_parameters(model) + final_channels * 1000 + 1000 == torchvision_total
    assert set(model.state_dict()) == torchvision_resnet_keys(blocks, bottleneck)
    assert model.out_channels == ([256, 512, 1024, 2048] if bottleneck else [64, 128, 256, 512])
    assert model.out_strides == [4, 8, 16, 32]


def test_resnet_spot_shapes_and_v15_stride():
    r18 = build_backbone("resnet18", [0, 1, 2, 3]).state_dict()
    assert r18["conv1.weight"].shape == (64, 3, 7, 7)
    assert r18["layer4.1.bn2.running_var"].shape == (512,)
    r50 = build_backbone("resnet50", [0, 1, 2, 3])
    state = r50.state_dict()
    assert state["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    assert state["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    # v1.5: the stride of a downsampling bottleneck sits on the 3x3 conv, not the first 1x1.
    assert r50.layer2[0].conv1.stride == (1, 1)
    assert r50.layer2[0].conv2.stride == (2, 2)


def test_resnet_forward_shapes_and_trimming():
    model = build_backbone("resnet34", [1, 2])
    assert not hasattr(model, "layer4")
    assert "layer4.*" in model.pretrained_ignore and "fc.*" in model.pretrained_ignore
    outputs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 128, 8, 12), (2, 256, 4, 6)]
    assert model.out_channels == [128, 256] and model.out_strides == [8, 16]


def test_build_backbone_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", [1, 2, 3])
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_backbone("resnet50", [1, 2, 3], drop_path_rate=0.1)
    with pytest.raises(ValueError, match="increasing"):
        build_backbone("resnet18", [2, 1])
    with pytest.raises(ValueError, match="0..3"):
        build_backbone("swin_t", [1, 4])


def official_swin_t_keys() -> set[str]:
    """Parameter keys of ``swin_tiny_patch4_window7_224.pth`` (buffers left out), from its structure."""
    keys = {f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
    for stage, depth in enumerate((2, 2, 6, 2)):
        for block in range(depth):
            prefix = f"layers.{stage}.blocks.{block}."
            keys.add(prefix + "attn.relative_position_bias_table")
            for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                keys |= {f"{prefix}{layer}.weight", f"{prefix}{layer}.bias"}
        if stage < 3:
            merging = ("reduction.weight", "norm.weight", "norm.bias")
            keys |= {f"layers.{stage}.downsample.{p}" for p in merging}
    return keys | {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_swin_t_matches_official_layout():
    model = build_backbone("swin_t", [0, 1, 2, 3])
    state = model.state_dict()
    output_norms = {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    classifier_only = {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert set(state) == (official_swin_t_keys() - classifier_only) | output_norms

    output_norm_params = sum(state[k].numel() for k in output_norms)
    classifier_params = 2 * 768 + 768 * 1000 + 1000
    assert count_parameters(model) - output_norm_params + classifier_params == 28_288_354

    assert state["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (169, 3)
    assert state["layers.2.downsample.reduction.weight"].shape == (768, 1536)
    assert state["patch_embed.proj.weight"].shape == (96, 3, 4, 4)
    assert model.out_channels == [96, 192, 384, 768] and model.out_strides == [4, 8, 16, 32]


def test_swin_t_bevfusion_input_shapes():
    model = build_backbone("swin_t", [1, 2, 3]).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 256, 704))
    assert [tuple(o.shape) for o in outputs] == [(1, 192, 32, 88), (1, 384, 16, 44), (1, 768, 8, 22)]
    assert model.out_channels == [192, 384, 768] and model.out_strides == [8, 16, 32]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_swin_t_odd_input_size_and_gradients():
    model = build_backbone("swin_t", [0, 1, 2, 3], drop_path_rate=0.2).train()
    images = torch.randn(2, 3, 100, 150, requires_grad=True)
    outputs = model(images)
    # 100x150 -> padded to 100x152 -> 25x38, then ceil-halving by PatchMerging.
    assert [tuple(o.shape) for o in outputs] == [
        (2, 96, 25, 38),
        (2, 192, 13, 19),
        (2, 384, 7, 10),
        (2, 768, 4, 5),
    ]
    sum(o.square().mean() for o in outputs).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_swin_trimmed_stages_are_not_built():
    model = build_backbone("swin_t", [0, 1])
    assert len(model.layers) == 2 and model.layers[1].downsample is None
    assert {"layers.2.*", "layers.3.*", "layers.1.downsample.*", "head.*"} <= set(model.pretrained_ignore)
    outputs = model(torch.randn(1, 3, 56, 56))
    assert [tuple(o.shape) for o in outputs] == [(1, 96, 14, 14), (1, 192, 7, 7)]


def region_ids(size: int, window: int, shift: int) -> torch.Tensor:
    """Region of each position of a rolled axis: 0 = never wraps, 1 = last window before the
    wrapped tail, 2 = tail that came from the start of the image."""
    position = torch.arange(size)
    return (position >= size - window).long() + (position >= size - shift).long()


def test_shifted_window_mask_matches_region_comparison():
    height, width, window, shift = 21, 28, 7, 3
    mask = shifted_window_attention_mask(height, width, window, shift)
    rows = region_ids(height, window, shift)[:, None].expand(height, width)
    cols = region_ids(width, window, shift)[None, :].expand(height, width)
    # Token (r, c) of window (wr, wc) is grid position (wr*7 + r, wc*7 + c); windows row-major.
    grid_rows = rows.reshape(height // window, window, width // window, window).permute(0, 2, 1, 3)
    grid_cols = cols.reshape(height // window, window, width // window, window).permute(0, 2, 1, 3)
    row_ids = grid_rows.reshape(-1, window * window)
    col_ids = grid_cols.reshape(-1, window * window)
    same_row_region = row_ids[:, :, None] == row_ids[:, None, :]
    same_region = same_row_region & (col_ids[:, :, None] == col_ids[:, None, :])
    assert mask.shape == (12, 49, 49)
    assert torch.equal(mask == 0, same_region)
    assert (mask[~same_region] == -100.0).all()
    # Only windows touching the bottom or right edge mix regions.
    assert (mask[0] == 0).all() and (mask[-1] != 0).any()


def test_shifted_block_cannot_see_across_the_wraparound():
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=7, shift_size=3).eval()
    tokens = torch.randn(1, 14, 14, 8)
    mask = shifted_window_attention_mask(14, 14, 7, 3)

    def output_at_origin(x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return block(x, attn_mask)[0, 0, 0]

    reference = output_at_origin(tokens, mask)
    # Not a constant offset: LayerNorm (norm1) would cancel it.
    perturbation = 3.0 * torch.randn(8)
    far_corner = tokens.clone()
    far_corner[0, 13, 13] += perturbation  # rolled into the same window as (0, 0), other region
    neighbour = tokens.clone()
    neighbour[0, 1, 1] += perturbation  # same window and region as (0, 0)

    torch.testing.assert_close(output_at_origin(far_corner, mask), reference, rtol=0, atol=1e-6)
    assert not torch.allclose(output_at_origin(neighbour, mask), reference, atol=1e-4)
    # Without the mask the wrapped-around token would leak in: the check above can fail.
    no_mask = torch.zeros_like(mask)
    leaked = output_at_origin(far_corner, no_mask)
    assert not torch.allclose(leaked, output_at_origin(tokens, no_mask), atol=1e-4)


def test_drop_path_drops_whole_samples_and_keeps_expectation():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    dropped = drop_path(x, 0.25, training=True)
    per_sample = dropped.flatten(1)
    assert ((per_sample == 0).all(dim=1) | (per_sample == 1 / 0.75).all(dim=1)).all()
    assert abs(dropped.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.25, training=False), x)
