"""Knowledge distillation of a camera-only BEV student from a LiDAR-camera teacher.

Methods register themselves in :data:`DISTILLERS` by name; :func:`build_distiller` picks one from
``config.distill.method``.
"""

from __future__ import annotations

from bridgeta.config import ExperimentConfig
from bridgeta.distill.base import (
    DISTILLERS,
    DistillOutput,
    Distiller,
    affinity_loss,
    bernoulli_kl,
    cell_mse,
    register,
)
from bridgeta.distill.bridgeta import BridgeTADistiller, TeacherAssistant
from bridgeta.distill.direct import DirectDistiller
from bridgeta.distill.feature_kd import FeatureKDDistiller
from bridgeta.distill.logit_kd import LogitKDDistiller
from bridgeta.distill.monotakd import MonoTAKDDistiller
from bridgeta.distill.tinybev import TinyBEVDistiller, init_from_previous_stage
from bridgeta.distill.young import dual_path_loss, optimal_epsilon
from bridgeta.models.bev_model import BEVModel

__all__ = [
    "DISTILLERS",
    "BridgeTADistiller",
    "DirectDistiller",
    "DistillOutput",
    "Distiller",
    "FeatureKDDistiller",
    "LogitKDDistiller",
    "MonoTAKDDistiller",
    "TinyBEVDistiller",
    "TeacherAssistant",
    "affinity_loss",
    "bernoulli_kl",
    "build_distiller",
    "check_same_inputs",
    "cell_mse",
    "dual_path_loss",
    "optimal_epsilon",
    "init_from_previous_stage",
    "register",
]


def check_same_inputs(student: BEVModel, teacher: BEVModel) -> None:
    """Teacher and student see the same batch, so their camera inputs must agree."""
    s_cam, t_cam = student.config.camera, teacher.config.camera
    if s_cam is None or t_cam is None:
        return  # a LiDAR-only teacher reads points, which any batch with LiDAR carries
    if tuple(s_cam.image_size) != tuple(t_cam.image_size) or s_cam.num_cameras != t_cam.num_cameras:
        raise ValueError(
            f"teacher takes {t_cam.num_cameras} x {tuple(t_cam.image_size)} images, the student "
            f"{s_cam.num_cameras} x {tuple(s_cam.image_size)}: they must read the same batch"
        )


def build_distiller(
    config: ExperimentConfig, student: BEVModel, teacher: BEVModel | None, assistant: BEVModel | None = None
) -> Distiller:
    """The distiller named by ``config.distill.method``, wrapping ``student`` and ``teacher`` (and
    a trained ``assistant`` for the methods that read one: MonoTAKD)."""
    if config.distill is None:
        raise ValueError("the experiment has no 'distill' section")
    method = config.distill.method
    if method not in DISTILLERS:
        raise ValueError(
            f"unknown distillation method '{method}' (known: {', '.join(sorted(DISTILLERS))})"
        )
    if teacher is None:
        raise ValueError(f"distillation method '{method}' needs a teacher model")
    check_same_inputs(student, teacher)
    if assistant is not None:
        check_same_inputs(student, assistant)
        return DISTILLERS[method](student, teacher, config.distill, assistant=assistant)
    return DISTILLERS[method](student, teacher, config.distill)
