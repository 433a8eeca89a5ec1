"""BridgeTA's dual-path loss, from Young's inequality (METHOD.md §1).

For any eps > 0: ``||S - T||^2 <= (1 + eps) ||S - TA||^2 + (1 + 1/eps) ||TA - T||^2``, tightest at
``eps* = b / a`` (a = ||S - TA||, b = ||TA - T||) where the bound is ``(a + b)^2``. Distances are
the per-cell mean of Eq. 8 (:func:`cell_mse`), so the inequality holds term by term.
"""

from __future__ import annotations

import torch

from bridgeta.distill.base import cell_mse


def optimal_epsilon(
    ta2s: torch.Tensor, t2ta: torch.Tensor, epsilon_range: tuple[float, float]
) -> torch.Tensor:
    """``eps* = sqrt(L_t2ta / L_ta2s)`` from detached values, clamped to ``epsilon_range``.

    Detached because eps* is a weight that tightens the bound, not a path for gradients; the clamp
    keeps it finite when either distance is ~0 (e.g. at initialisation of an identical TA).
    """
    low, high = epsilon_range
    if not 0 < low <= high:
        raise ValueError(f"epsilon_range must satisfy 0 < low <= high, got {epsilon_range}")
    ta2s, t2ta = ta2s.detach(), t2ta.detach()
    ratio = t2ta / ta2s.clamp_min(torch.finfo(ta2s.dtype).tiny)
    return ratio.sqrt().clamp(low, high)


def dual_path_loss(
    student: torch.Tensor,
    assistant: torch.Tensor,
    teacher: torch.Tensor,
    epsilon: str | float = "optimal",
    epsilon_range: tuple[float, float] = (0.01, 100.0),
    mutual: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(1 + eps) L_ta2s + (1 + 1/eps) L_t2ta`` for one level, and its diagnostics.

    Gradient routing (METHOD.md §1): ``L_t2ta`` trains the assistant toward the teacher (the
    teacher side is detached); ``L_ta2s`` trains the student toward the assistant, whose side is
    a detached target, so the student never pulls the assistant toward itself. ``mutual=True``
    lets ``L_ta2s`` move the assistant too (an ablation, not the method).

    ``epsilon`` is ``"optimal"`` (eps*, per call) or a fixed positive float (Figure 5's ablation;
    not clamped). The terms dict holds detached ``ta2s``, ``t2ta``, ``epsilon`` and ``gap_l2`` =
    ``sqrt(cell_mse(S, T))``, the student-teacher distance the paper tracks in Figure 5.
    """
    ta2s = cell_mse(student, assistant if mutual else assistant.detach())
    t2ta = cell_mse(assistant, teacher.detach())
    if epsilon == "optimal":
        eps = optimal_epsilon(ta2s, t2ta, epsilon_range)
    elif isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and epsilon > 0:
        eps = torch.tensor(float(epsilon), device=ta2s.device)
    else:
        raise ValueError(f"epsilon must be 'optimal' or a positive number, got {epsilon!r}")
    loss = (1 + eps) * ta2s + (1 + 1 / eps) * t2ta
    with torch.no_grad():
        gap = cell_mse(student, teacher).sqrt()
    terms = {"ta2s": ta2s.detach(), "t2ta": t2ta.detach(), "epsilon": eps, "gap_l2": gap}
    return loss, terms
