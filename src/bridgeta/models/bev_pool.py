"""BEV pooling ("splat"): sum frustum point features into the BEV cells they fall in.

Semantics follow LSS / BEVFusion: every point is quantised to an integer cell ``(ix, iy, iz)`` of a
:class:`~bridgeta.geometry.BEVGrid`, points outside the grid are dropped, the features of the points
in one cell are summed, and the vertical bins are concatenated into channels the way BEVFusion does
(``torch.cat(x.unbind(dim=2), 1)``: output channel ``z * C + c``).

The geometry of a batch is fixed while its features change (and need gradients), so the work is
split in two:

* :func:`compute_pool_plan` turns cells into a :class:`BEVPoolPlan` once per batch: the flattened
  cell rank ``((b * Z + z) * X + x) * Y + y`` of every point, with dropped points sent to one extra
  "discard" rank past the last cell. The rank-sorted segments (sort permutation, run boundaries)
  are built lazily by :attr:`BEVPoolPlan.segments`, because only the LSS reference needs them.
* :func:`bev_pool` sums features with one ``scatter_add_`` over those ranks. For a row-expanded
  index, PyTorch's CPU kernel radix-sorts the ranks into CSR form and reduces each cell's run in
  parallel, i.e. it *is* a sorted-rank segment sum, with the gather of the features fused in; its
  autograd backward is a plain row gather (exact, parallel, zero for the discard row). On CUDA
  the same call is an atomic add per element. Exported to ONNX, it is one ``ScatterND`` with
  ``reduction="add"`` over the ranks (:class:`_ScatterRowsForONNX`).

Why this variant: forward+backward at ``bevfusion-c`` size on 2 CPU threads (``bridgeta bench
bev-pool`` and the same harness for the others) took ~0.25 s with ``scatter_add_`` or ``index_add_``
over all points (equal); 1.2-1.7 s with ``index_add_`` / ``scatter_add_`` / ``segment_reduce`` on the
rank-sorted copy of the features (materialising that copy and scattering its gradient back to
frustum order dominate); ~3 s with the LSS cumsum trick. A CSR sparse matmul over the pre-sorted
plan plus a gather backward pools in ~0.19 s, but needs the rank sort in every plan (+0.07 s per
batch, so no gain when one plan serves one pool, as in LSS), a custom autograd Function and has no
half/bfloat16 CPU kernel; ``scatter_add_`` needs none of that.

Two references live here as well: :func:`bev_pool_cumsum_reference` (LSS's "QuickCumsum", the
baseline the benchmark has to beat) and :func:`bev_pool_naive_reference` (dense one-hot matmul,
obviously correct, for tests on tiny inputs only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from bridgeta.geometry import BEVGrid


@dataclass(frozen=True)
class PoolSegments:
    """Kept points sorted by cell rank: the layout the LSS cumsum trick works on.

    order:   ``(K,)`` indices into the plan's points of the kept points, sorted by rank (stable).
    rank:    ``(K,)`` the sorted ranks, so ``rank == plan.point_rank[order]``.
    is_last: ``(K,)`` bool, True at the last point of each run of equal ranks; these are the
             segment boundaries, one per occupied cell (``rank[is_last]`` lists the cells).
    """

    order: torch.Tensor
    rank: torch.Tensor
    is_last: torch.Tensor


@dataclass(frozen=True, eq=False)
class BEVPoolPlan:
    """Where every frustum point of a batch goes; build it with :func:`compute_pool_plan`.

    point_rank: ``(P,)`` long, the flattened cell ``((b * Z + z) * X + x) * Y + y`` of each point,
                or ``num_cells`` (one discard row past the grid) for points outside the grid.
    batch_size, num_z, shape: output layout ``(B, Z, (X, Y))``.
    """

    point_rank: torch.Tensor
    batch_size: int
    num_z: int
    shape: tuple[int, int]

    @property
    def num_points(self) -> int:
        return self.point_rank.shape[0]

    @property
    def num_cells(self) -> int:
        return self.batch_size * self.num_z * self.shape[0] * self.shape[1]

    @property
    def kept(self) -> torch.Tensor:
        """``(P,)`` bool mask of the points that fall inside the grid."""
        return self.point_rank < self.num_cells

    @cached_property
    def segments(self) -> PoolSegments:
        """Rank-sorted kept points; computed on first use and cached with the plan."""
        kept_index = torch.nonzero(self.kept).squeeze(1)
        rank, permutation = torch.sort(self.point_rank[kept_index], stable=True)
        is_last = torch.ones_like(rank, dtype=torch.bool)
        is_last[:-1] = rank[1:] != rank[:-1]
        return PoolSegments(order=kept_index[permutation], rank=rank, is_last=is_last)


def compute_pool_plan(
    cells: torch.Tensor, batch_index: torch.Tensor, grid: BEVGrid, batch_size: int
) -> BEVPoolPlan:
    """Plan the pooling of points with integer cells ``cells`` (``(..., 3)``: ix, iy, iz).

    ``batch_index`` (long) gives each point's sample and is broadcast to ``cells.shape[:-1]``, so a
    ``(B, 1, 1, ...)`` arange works for frustum-shaped cells. Points are numbered in the row-major
    order of ``cells.shape[:-1]``; features passed to :func:`bev_pool` must use the same order.
    Points outside ``grid`` (x, y and z) or with a batch index outside ``[0, batch_size)`` are
    dropped. No host synchronisation happens here, so building a plan on GPU does not stall.
    """
    if cells.shape[-1] != 3:
        raise ValueError(f"cells must be (..., 3) integer (ix, iy, iz), got {tuple(cells.shape)}")
    if cells.dtype.is_floating_point:
        raise ValueError("cells must be integer; quantise points with BEVGrid.point_to_cell")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_index = torch.broadcast_to(batch_index, cells.shape[:-1]).reshape(-1).long()
    cells = cells.reshape(-1, 3).long()
    size_x, size_y = grid.shape
    size_z = grid.num_z
    kept = grid.in_bounds(cells) & (batch_index >= 0) & (batch_index < batch_size)
    rank = ((batch_index * size_z + cells[:, 2]) * size_x + cells[:, 0]) * size_y + cells[:, 1]
    discard = batch_size * size_z * size_x * size_y
    return BEVPoolPlan(
        point_rank=torch.where(kept, rank, torch.full_like(rank, discard)),
        batch_size=batch_size,
        num_z=size_z,
        shape=(size_x, size_y),
    )


def _check_features(features: torch.Tensor, plan: BEVPoolPlan) -> None:
    if features.dim() != 2 or features.shape[0] != plan.num_points:
        raise ValueError(
            f"features must be (P, C) with P = {plan.num_points} points of the plan, "
            f"got {tuple(features.shape)}"
        )


def _cells_to_bev(cell_features: torch.Tensor, plan: BEVPoolPlan) -> torch.Tensor:
    """``(B*Z*X*Y, C)`` in rank order -> ``(B, Z*C, X, Y)`` with channel ``z * C + c``."""
    channels = cell_features.shape[1]
    size_x, size_y = plan.shape
    bev = cell_features.view(plan.batch_size, plan.num_z, size_x, size_y, channels)
    bev = bev.permute(0, 1, 4, 2, 3).reshape(plan.batch_size, plan.num_z * channels, size_x, size_y)
    # With one z bin the reshape is a view with channels-last strides. Make it plain NCHW: on
    # torch 2.13 CPU, oneDNN's weight gradient of a 1x1 stride-2 conv segfaults on channels-last
    # inputs with fewer than 16 channels (a narrow camera BEV feeding the decoder).
    return bev.contiguous()


def _scatter_rows(features: torch.Tensor, point_rank: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``(num_rows, C)`` sums of the feature rows ``(P, C)`` at rows ``point_rank`` ``(P,)``."""
    index = point_rank.unsqueeze(1).expand(-1, features.shape[1])
    return features.new_zeros(num_rows, features.shape[1]).scatter_add_(0, index, features)


class _ScatterRowsForONNX(torch.autograd.Function):
    """:func:`_scatter_rows` in PyTorch; one ONNX ``ScatterND(reduction="add")`` when exported.

    The TorchScript exporter would write ``scatter_add_`` as ``ScatterElements`` over the
    row-expanded index, materialising a ``(P, C)`` int64 index: at ``bevfusion-c`` size (2 M points,
    80 channels) 1.3 GB, and onnxruntime's element-wise kernel took ~4x PyTorch's whole forward.
    ``ScatterND`` adds whole rows at ``(P, 1)`` indices (24x faster than ``ScatterElements`` in
    onnxruntime on 500k x 80 rows, 16x less memory). Used only while exporting (no backward).
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, point_rank: torch.Tensor, num_rows: int, channels: int) -> torch.Tensor:
        return _scatter_rows(features, point_rank, num_rows)

    @staticmethod
    def symbolic(g, features, point_rank, num_rows: int, channels: int):  # pragma: no cover - exporter
        shape = g.op("Constant", value_t=torch.tensor([num_rows, channels], dtype=torch.int64))
        zeros = g.op("CastLike", g.op("ConstantOfShape", shape), features)
        rows = g.op("Unsqueeze", point_rank, g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64)))
        return g.op("ScatterND", zeros, rows, features, reduction_s="add")


def bev_pool(features: torch.Tensor, plan: BEVPoolPlan) -> torch.Tensor:
    """Sum point features ``(P, C)`` into BEV cells: ``(B, Z*C, X, Y)``, channel ``z * C + c``.

    Differentiable w.r.t. ``features`` (dropped points get zero gradient). Accumulates in the
    dtype of ``features``. Exported to ONNX (opset >= 16) as one ``ScatterND`` with add reduction,
    the same sums; out-of-grid points go to the discard row there too, so which points are kept is
    decided by the graph's inputs at run time.
    """
    _check_features(features, plan)
    # One row past the grid receives the dropped points, so they need no gather/mask pass.
    if torch.onnx.is_in_onnx_export():
        # While tracing, sizes taken from shapes are traced values (and the traced graph does not
        # always know the feature width); the buffer's shape is a constant of the exported graph
        # (all its shapes are fixed), so pass it as plain ints.
        num_rows, channels = int(plan.num_cells) + 1, int(features.shape[1])
        cells = _ScatterRowsForONNX.apply(features, plan.point_rank, num_rows, channels)
    else:
        cells = _scatter_rows(features, plan.point_rank, plan.num_cells + 1)
    return _cells_to_bev(cells[:-1], plan)


class _QuickCumsum(torch.autograd.Function):
    """LSS's segment sum over rank-sorted rows: cumsum, keep run ends, difference.

    The backward does not differentiate through the cumsum: every point of a run receives the
    gradient of its run's sum, found by counting the run ends before it.
    """

    @staticmethod
    def forward(ctx, sorted_features: torch.Tensor, is_last: torch.Tensor) -> torch.Tensor:
        running = sorted_features.cumsum(0)[is_last]
        sums = torch.cat([running[:1], running[1:] - running[:-1]])
        ctx.save_for_backward(is_last)
        return sums

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor) -> tuple[torch.Tensor, None]:
        (is_last,) = ctx.saved_tensors
        run_of_point = torch.cumsum(is_last, 0) - is_last.long()
        return grad_sums[run_of_point], None


def bev_pool_cumsum_reference(features: torch.Tensor, plan: BEVPoolPlan) -> torch.Tensor:
    """LSS's pooling: gather kept points in rank order, QuickCumsum, write the run sums to cells.

    Same output as :func:`bev_pool`; the float32 running sum loses precision on large inputs (the
    reason LSS-style code drifts from an exact sum). Uses (and builds once) ``plan.segments``.
    """
    _check_features(features, plan)
    segments = plan.segments
    sums = _QuickCumsum.apply(features[segments.order], segments.is_last)
    cells = features.new_zeros(plan.num_cells, features.shape[1])
    cells = cells.index_copy(0, segments.rank[segments.is_last], sums)
    return _cells_to_bev(cells, plan)


def bev_pool_naive_reference(
    features: torch.Tensor,
    cells: torch.Tensor,
    batch_index: torch.Tensor,
    grid: BEVGrid,
    batch_size: int,
) -> torch.Tensor:
    """Obviously-correct pooling for tests: a dense one-hot ``(cells, points)`` matrix times features.

    Independent of :func:`compute_pool_plan` (own bounds test, own indexing, BEVFusion's literal
    ``torch.cat(x.unbind(dim=2), 1)``), so it checks the plan too. Memory is ``cells * points``:
    tiny inputs only.
    """
    cells = cells.reshape(-1, 3).long()
    batch_index = torch.broadcast_to(batch_index, cells.shape[:1]).long()
    size_x, size_y = grid.shape
    size_z = grid.num_z
    channels = features.shape[1]
    dense = features.new_zeros(batch_size, channels, size_z, size_x, size_y)
    for b in range(batch_size):
        inside = grid.in_bounds(cells) & (batch_index == b)
        onehot = features.new_zeros(size_z, size_x, size_y, cells.shape[0])
        points = torch.nonzero(inside).squeeze(1)
        ix, iy, iz = cells[points].unbind(1)
        onehot[iz, ix, iy, points] = 1.0
        summed = onehot.reshape(-1, cells.shape[0]) @ features
        dense[b] = summed.reshape(size_z, size_x, size_y, channels).permute(3, 0, 1, 2)
    return torch.cat(dense.unbind(dim=2), 1)
