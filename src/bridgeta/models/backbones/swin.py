"""Swin Transformer (Swin-T) image backbone for arbitrary input sizes.

Behaviour follows the official detection backbone (microsoft/Swin-Transformer-Object-Detection,
``mmdet/models/backbones/swin_transformer.py``): inputs of any size are padded to the patch size,
each block pads its tokens to the window size, the shifted-window attention mask is computed for
the actual padded size at run time, and ``PatchMerging`` pads odd sizes. Parameter names follow the
official classification release (``swin_tiny_patch4_window7_224.pth``) so its weights load with
:func:`bridgeta.models.checkpoint.load_pretrained`; derived buffers (``relative_position_index``,
``attn_mask``) are recomputed here rather than read from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.models.backbones.resnet import validate_out_indices

# Additive logit for token pairs from different regions of a shifted window. The official code
# uses -100 rather than -inf; kept for bit-level agreement with it (exp(-100) is negligible).
MASKED_LOGIT = -100.0


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch for whole samples, rescaling the survivors.

    Dropping per sample (not per element) removes the block for that sample, which is what
    regularises deep transformers; dividing by the keep probability keeps the expectation.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of the window -> ``(B * nW, window**2, C)``.

    Windows are ordered batch-major, then row of windows, then column of windows, matching
    :func:`shifted_window_attention_mask`.
    """
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window**2, C)`` -> ``(B, H, W, C)``."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_attention_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Additive attention mask ``(nW, N, N)`` for a cyclically shifted, padded token grid.

    After rolling the grid by ``-shift_size``, windows at the bottom/right edge contain tokens
    that were far apart in the image; they may only attend within their own region. Regions are
    the official three slices per axis, on the padded ``height x width`` grid.
    """
    region = torch.zeros(1, height, width, 1, device=device)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region_id = 0
    for rows in slices:
        for cols in slices:
            region[:, rows, cols, :] = region_id
            region_id += 1
    region_windows = window_partition(region, window_size).squeeze(-1)
    different = region_windows.unsqueeze(1) != region_windows.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill(different, MASKED_LOGIT)


def relative_position_index(window_size: int) -> torch.Tensor:
    """``(N, N)`` index into the ``(2w-1)**2`` bias table for every pair of tokens in a window."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``windows (B*nW, N, C)``, ``mask (nW, N, N)`` additive or ``None`` -> ``(B*nW, N, C)``."""
        num_windows_total, tokens, channels = windows.shape
        qkv = self.qkv(windows).view(num_windows_total, tokens, 3, self.num_heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        logits = (query * self.scale) @ key.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        logits = logits + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            logits = logits.view(-1, num_windows, self.num_heads, tokens, tokens)
            logits = (logits + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, tokens, tokens)
        attention = self.attn_drop(logits.softmax(dim=-1))

        out = (attention @ value).transpose(1, 2).reshape(num_windows_total, tokens, channels)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, each pre-norm with a stochastic-depth residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """``x (B, H, W, C)``; ``attn_mask`` is the stage's mask for the padded grid (shifted
        blocks only use it) -> ``(B, H, W, C)``."""
        _, height, width, _ = x.shape
        window = self.window_size
        shortcut = x
        x = self.norm1(x)
        # Pad after the norm, as the official code does: padded tokens are exact zeros.
        pad_bottom = (window - height % window) % window
        pad_right = (window - width % window) % window
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_height, padded_width = x.shape[1:3]

        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = self.attn(window_partition(x, window), attn_mask if self.shift_size else None)
        x = window_reverse(windows, window, padded_height, padded_width)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))

        x = shortcut + self.drop_path(x[:, :height, :width, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + linear ``4C -> 2C``; odd sizes are zero-padded first."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``."""
        _, height, width, _ = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Concat order of the official code; the checkpoint's reduction weight depends on it.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Official ``BasicLayer``: blocks alternating regular / shifted windows, then (optionally)
    patch merging for the next stage."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path_rates: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if index % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path_rate=drop_path_rates[index],
            )
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, H, W, C)`` -> (stage output ``(B, H, W, C)``, next stage input or ``None``)."""
        _, height, width, _ = x.shape
        window = self.window_size
        # Ceiling division on non-negative operands only: traced for ONNX, ``//`` becomes an
        # integer Div, which truncates, so ``-(-h // w)`` would round the padded grid down.
        padded_height = (height + window - 1) // window * window
        padded_width = (width + window - 1) // window * window
        attn_mask = shifted_window_attention_mask(
            padded_height, padded_width, window, self.shift_size, x.device
        ).to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x, None if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution; the input is zero-padded bottom/right."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, ceil(H/p), ceil(W/p), embed_dim)``."""
        height, width = x.shape[2:]
        patch = self.patch_size
        x = F.pad(x, (0, (patch - width % patch) % patch, 0, (patch - height % patch) % patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Hierarchical Swin backbone returning ``(B, C_k, H_k, W_k)`` maps for ``out_indices``.

    Stage ``k`` has ``embed_dim * 2**k`` channels at stride ``patch_size * 2**k``. Each output gets
    its own LayerNorm ``norm{k}`` (as in the detection backbone). Stages after the last requested
    one, and the merging that would feed them, are not built, so all parameters are used.
    """

    #: Checkpoint keys of the classification release that the backbone has no use for:
    #: the classifier, its final norm, and buffers that are recomputed here.
    pretrained_ignore: tuple[str, ...] = ("head.*", "norm.*", "*.attn_mask", "*.relative_position_index")

    def __init__(
        self,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        patch_size: int = 4,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.out_indices = validate_out_indices(out_indices, len(depths))
        num_built = self.out_indices[-1] + 1
        stage_dims = [embed_dim * 2**stage for stage in range(len(depths))]

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        # Drop-path rates grow linearly over all blocks of the full network (official schedule),
        # so trimming trailing stages does not change the rates of the ones that are kept.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for stage in range(num_built):
            first_block = sum(depths[:stage])
            self.layers.append(
                SwinStage(
                    stage_dims[stage],
                    depths[stage],
                    num_heads[stage],
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    rates[first_block : first_block + depths[stage]],
                    downsample=stage < num_built - 1,
                )
            )
        for stage in self.out_indices:
            self.add_module(f"norm{stage}", nn.LayerNorm(stage_dims[stage]))

        self.out_channels = [stage_dims[stage] for stage in self.out_indices]
        self.out_strides = [patch_size * 2**stage for stage in self.out_indices]
        trimmed = [f"layers.{stage}.*" for stage in range(num_built, len(depths))]
        if num_built < len(depths):
            trimmed.append(f"layers.{num_built - 1}.downsample.*")
        self.pretrained_ignore = type(self).pretrained_ignore + tuple(trimmed)
        self.apply(init_linear_and_layernorm)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)``, any H and W -> one ``(B, C_k, H_k, W_k)`` map per output index."""
        x = self.patch_embed(x)
        outputs = []
        for stage, layer in enumerate(self.layers):
            stage_output, x = layer(x)
            if stage in self.out_indices:
                normed = getattr(self, f"norm{stage}")(stage_output)
                outputs.append(normed.permute(0, 3, 1, 2).contiguous())
        return outputs


def init_linear_and_layernorm(module: nn.Module) -> None:
    """Official initialisation: truncated-normal (std 0.02) linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def swin_t(out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.0) -> SwinTransformer:
    """Swin-T: embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7, patch 4."""
    return SwinTransformer(out_indices, drop_path_rate=drop_path_rate)
