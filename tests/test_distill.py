"""Distillation: Young's bound and eps*, frozen teacher, gradient routing, registry, baselines."""

import math
from types import SimpleNamespace

import pytest
import torch

from bridgeta.config import DistillConfig, LevelWeights, load_config
from bridgeta.distill import (
    DISTILLERS,
    BridgeTADistiller,
    affinity_loss,
    bernoulli_kl,
    build_distiller,
    cell_mse,
    dual_path_loss,
)
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.types import BEVOutputs
from bridgeta.rig import reference_inputs

# ------------------------------------------------------------------------------------ Young


def _maps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, 5, 6, generator=g) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("epsilon", [0.05, 0.3, 1.0, 2.5, 40.0])
def test_young_bound_holds_for_any_epsilon(epsilon):
    for seed in range(5):
        s, a, t = _maps(seed)
        loss, terms = dual_path_loss(s, a, t, epsilon=epsilon)
        assert cell_mse(s, t) <= loss + 1e-5
        expected = (1 + epsilon) * cell_mse(s, a) + (1 + 1 / epsilon) * cell_mse(a, t)
        assert torch.allclose(loss, expected)
        assert math.isclose(terms["gap_l2"].item(), cell_mse(s, t).sqrt().item(), rel_tol=1e-6)


def test_optimal_epsilon_gives_the_tightest_bound():
    s, a, t = _maps(1)
    loss, terms = dual_path_loss(s, a, t, epsilon="optimal")
    a_norm, b_norm = cell_mse(s, a).sqrt(), cell_mse(a, t).sqrt()
    assert torch.allclose(terms["epsilon"], b_norm / a_norm)
    assert torch.allclose(loss, (a_norm + b_norm) ** 2, rtol=1e-5)
    for epsilon in (0.5, 0.9, 1.1, 2.0):
        assert loss <= dual_path_loss(s, a, t, epsilon=epsilon)[0] + 1e-6


def test_optimal_epsilon_is_clamped_at_the_range_edges():
    s, _, t = _maps(2)
    # TA equal to the student: L_ta2s = 0 -> eps* would be infinite.
    _, terms = dual_path_loss(s, s.clone(), t, epsilon_range=(0.1, 10.0))
    assert terms["epsilon"].item() == pytest.approx(10.0)
    # TA equal to the teacher: L_t2ta = 0 -> eps* would be 0.
    loss, terms = dual_path_loss(s, t.clone(), t, epsilon_range=(0.1, 10.0))
    assert terms["epsilon"].item() == pytest.approx(0.1)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="epsilon"):
        dual_path_loss(s, s, t, epsilon=-1.0)


def test_no_gradient_flows_through_epsilon():
    s, a, t = _maps(3)
    s.requires_grad_(True)
    loss, terms = dual_path_loss(s, a, t)
    (grad,) = torch.autograd.grad(loss, s)
    eps = terms["epsilon"]
    cells = s.shape[0] * s.shape[2] * s.shape[3]
    # d/dS of (1 + eps) * mean_cells ||S - A||^2 with eps constant.
    analytic = (1 + eps) * 2 * (s.detach() - a) / cells
    assert torch.allclose(grad, analytic, atol=1e-7)
    # At eps* dL/d(eps) = 0 (envelope theorem), so the value of the gradient alone cannot reveal
    # a live eps; the detached weight must also carry no autograd graph.
    assert not eps.requires_grad and eps.grad_fn is None


# ------------------------------------------------------------------------------ distances


def test_bernoulli_kl_matches_hand_computation():
    t = torch.tensor([[[[2.0]], [[-1.0]]]])
    s = torch.tensor([[[[0.0]], [[1.0]]]])
    temperature = 2.0

    def kl(x: float, y: float) -> float:
        p, q = 1 / (1 + math.exp(-x / temperature)), 1 / (1 + math.exp(-y / temperature))
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    expected = (kl(2.0, 0.0) + kl(-1.0, 1.0)) / 2 * temperature**2
    assert bernoulli_kl(t, s, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert bernoulli_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def configs():
    return load_config("tiny-c"), load_config("tiny-lc")


def _models(configs, seed: int = 0) -> tuple[BEVModel, BEVModel]:
    torch.manual_seed(seed)
    return BEVModel(configs[0].model), BEVModel(configs[1].model)


def _batch(configs):
    torch.manual_seed(1)
    inputs = reference_inputs(1, (64, 176), 6, with_lidar=True, points_per_sample=3000)
    labels = (torch.rand(1, 6, 100, 100) > 0.7).float()
    return inputs, labels


def _distiller(configs, method: str = "bridgeta", **options) -> BridgeTADistiller:
    student, teacher = _models(configs)
    experiment = configs[0]
    experiment.distill = DistillConfig(method=method, **options)
    return build_distiller(experiment, student, teacher)


def test_registry_and_unknown_method(configs):
    assert set(DISTILLERS) >= {"bridgeta", "direct", "feature_kd", "logit_kd"}
    student, teacher = _models(configs)
    experiment = configs[0]
    experiment.distill = DistillConfig(method="nope")
    with pytest.raises(ValueError, match="unknown distillation method 'nope'.*bridgeta.*direct"):
        build_distiller(experiment, student, teacher)


def test_training_step_freezes_teacher_and_trains_student_and_ta(configs):
    distiller = _distiller(configs)
    inputs, labels = _batch(configs)
    distiller.train()
    assert not distiller.teacher.training and distiller.student.training
    teacher_state = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in distiller.student.parameters()]
    ta_before = [p.detach().clone() for p in distiller.assistant.parameters()]
    learnable = list(distiller.learnable_parameters())
    assert not {id(p) for p in learnable} & {id(p) for p in distiller.teacher.parameters()}
    optimizer = torch.optim.AdamW(learnable, lr=1e-2)

    out = distiller(inputs, labels)
    expected_keys = {"kd/fld", "kd/dld", "kd/lld", "kd/lld_aux"}
    expected_keys |= {f"seg/{c}" for c in distiller.student.classes}
    expected_keys |= {f"ta_seg/{c}" for c in distiller.student.classes}
    assert set(out.losses) == expected_keys
    for level in ("fld", "dld", "lld"):
        for name in ("epsilon", "ta2s", "t2ta", "gap_l2"):
            assert math.isfinite(out.logs[f"{level}/{name}"])
    optimizer.zero_grad()
    out.total.backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    optimizer.step()

    for key, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key  # weights and BN running stats
    assert any(not torch.equal(p, b) for p, b in zip(distiller.student.parameters(), student_before))
    assert any(not torch.equal(p, b) for p, b in zip(distiller.assistant.parameters(), ta_before))
    distiller.train(True)
    assert not distiller.teacher.training


def test_student_is_exactly_the_baseline(configs):
    distiller = _distiller(configs)
    baseline = BEVModel(configs[0].model)
    student_shapes = {k: v.shape for k, v in distiller.student.state_dict().items()}
    baseline_shapes = {k: v.shape for k, v in baseline.state_dict().items()}
    assert student_shapes == baseline_shapes
    assert str(distiller.student) == str(baseline)
    count = sum(p.numel() for p in distiller.student.parameters())
    assert count == sum(p.numel() for p in baseline.parameters())
    # The TA is extra and training-only: it lives beside the student, not inside it.
    assert sum(p.numel() for p in distiller.assistant.parameters()) > 0
    assert not any(k.startswith("assistant") for k in distiller.student.state_dict())


@pytest.mark.parametrize("ta_grad", [False, True])
def test_ta_gradient_to_student_camera_switch(configs, ta_grad):
    distiller = _distiller(configs, ta_grad_to_student=ta_grad)
    inputs, _ = _batch(configs)
    student = distiller.student(inputs)
    teacher = distiller.teacher_forward(inputs)
    ta = distiller.assistant_forward(student, teacher)
    cell_mse(ta.fused_bev, teacher.fused_bev).backward()  # the FLD teacher->TA term alone
    grads = [p.grad for p in distiller.student.camera_encoder.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == ta_grad
    assert any(p.grad is not None for p in distiller.assistant.fuser.parameters())


def test_crosskd_aux_reaches_student_decoder_not_teacher_head(configs):
    distiller = _distiller(configs)
    inputs, _ = _batch(configs)
    student = distiller.student(inputs)
    teacher = distiller.teacher_forward(inputs)
    ta = distiller.assistant_forward(student, teacher)
    ta_bn = {k: v.clone() for k, v in distiller.assistant.head.state_dict().items()}
    # The teacher's half alone reaches the decoder (the TA probe's half would hide a detached one).
    decoder = list(distiller.student.decoder.parameters())
    teacher_half = torch.autograd.grad(distiller.teacher_head_kl(student, teacher), decoder, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in teacher_half)
    distiller.crosskd_aux(student, teacher, ta).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.decoder.parameters())
    assert all(p.grad is None for p in distiller.teacher.head.parameters())
    assert all(p.grad is None for p in distiller.assistant.head.parameters())
    for key, value in distiller.assistant.head.state_dict().items():
        assert torch.equal(value, ta_bn[key]), key


# ---------------------------------------------------------------------- baselines by hand


class _Fixed(torch.nn.Module):
    """A stand-in model returning fixed tensors: the baselines' losses can be checked by hand."""

    classes = ("drivable_area",)
    # What the distillers read of a model's config: the map head's loss weight.
    config = SimpleNamespace(heads=SimpleNamespace(map=SimpleNamespace(weight=1.0)))
    # What feature_kd checks when it is built: the camera and fused BEVs' channels and grid.
    _grid = SimpleNamespace(x=(0.0, 2.0, 1.0), y=(0.0, 2.0, 1.0))
    camera_encoder = SimpleNamespace(out_channels=3, output_grid=_grid)
    lidar_encoder = fuser = None
    feature_grid = _grid

    def __init__(self, camera: float, fused: float, decoded: float, logit: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        full = lambda v, c: torch.full((1, c, 2, 2), float(v))  # noqa: E731
        self.values = (full(camera, 3), full(fused, 3), full(decoded, 2), full(logit, 1))

    def forward(self, inputs) -> BEVOutputs:
        camera, fused, decoded, logit = (v * self.scale for v in self.values)
        return BEVOutputs(camera, None, fused, decoded, logit, None)


def _fixed_run(method: str, **options):
    student, teacher = _Fixed(1.0, 1.0, 0.0, 0.5), _Fixed(0.0, 3.0, 2.0, -1.0)
    config = DistillConfig(method=method, **options)
    distiller = DISTILLERS[method](student, teacher, config)
    return distiller(None, torch.zeros(1, 1, 2, 2))


def test_direct_feature_and_logit_kd_values_by_hand():
    out = _fixed_run("direct", weights=LevelWeights(fld=1.0, dld=0.5, lld=2.0), lld_aux=False)
    # FLD: 3 channels x (1 - 3)^2 = 12; DLD: 2 x (0 - 2)^2 = 8 (x0.5); LLD: (0.5 + 1)^2 = 2.25 (x2).
    assert out.losses["kd/fld"].item() == pytest.approx(12.0)
    assert out.losses["kd/dld"].item() == pytest.approx(4.0)
    assert out.losses["kd/lld"].item() == pytest.approx(4.5)
    assert out.logs["fld/gap_l2"] == pytest.approx(math.sqrt(12.0))

    out = _fixed_run("feature_kd")
    assert set(k for k in out.losses if k.startswith("kd/")) == {"kd/feature"}
    assert out.losses["kd/feature"].item() == pytest.approx(12.0)

    out = _fixed_run("logit_kd", temperature=1.0)
    p, q = 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.5))
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert out.losses["kd/logit"].item() == pytest.approx(expected, rel=1e-5)
    # Total = focal seg term (logit 0.5, label 0) + the KD term.
    focal = torch.sigmoid(torch.tensor(0.5)) ** 2 * torch.nn.functional.softplus(torch.tensor(0.5))
    assert out.total.item() == pytest.approx(expected + focal.item(), rel=1e-5)


@pytest.mark.parametrize("lld_aux", [True, False])
def test_direct_has_crosskds_teacher_half_through_the_teachers_head(configs, lld_aux):
    """w/o TA differs from BridgeTA by the TA only: with ``lld_aux`` its L_LLD also holds
    ``KL(L^T || teacher.head(F_dec^S))`` (the half of CrossKD that needs no TA: the paper's
    58.2 row; without it, the 57.8 row). On fixed logits by hand, and its gradient reaches the
    student's decoder through the teacher's head, not through the student's own head."""
    distiller = _distiller(configs, method="direct", lld_aux=lld_aux, weights=LevelWeights(lld=1.0, lld_aux=0.5))
    inputs, labels = _batch(configs)
    out = distiller(inputs, labels)
    kd = {k for k in out.losses if k.startswith("kd/")}
    assert kd == {"kd/fld", "kd/dld", "kd/lld"} | ({"kd/lld_aux"} if lld_aux else set())
    if not lld_aux:
        return
    teacher = distiller.teacher_forward(inputs)
    with torch.no_grad():
        through_teacher = distiller.teacher.head(out.student.decoded_bev)
    p, q = torch.sigmoid(teacher.logits), torch.sigmoid(through_teacher)
    by_hand = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
    assert out.losses["kd/lld_aux"].item() == pytest.approx(0.5 * by_hand.item(), rel=1e-4)
    aux = out.losses["kd/lld_aux"]
    decoder = torch.autograd.grad(aux, list(distiller.student.decoder.parameters()), retain_graph=True)
    assert any(g.abs().sum() > 0 for g in decoder)
    own_head = torch.autograd.grad(aux, list(distiller.student.head.parameters()), allow_unused=True)
    assert all(g is None for g in own_head)


@pytest.mark.parametrize("method", ["bridgeta", "direct"])
def test_ablation_switches_select_terms(configs, method):
    options = dict(epsilon="fixed", epsilon_fixed=0.5) if method == "bridgeta" else {}
    distiller = _distiller(configs, method, levels=("fld", "dld"), relational_weight=0.5, **options)
    distiller.train()
    inputs, labels = _batch(configs)
    out = distiller(inputs, labels)
    kd = {k for k in out.losses if k.startswith("kd/")}
    assert kd == {"kd/fld", "kd/dld", "kd/relational"}  # no LLD, so no CrossKD aux either
    if method == "bridgeta":
        assert out.logs["fld/epsilon"] == pytest.approx(0.5)
    # the relational term is the weighted affinity MSE of the decoded BEVs, the teacher's a target
    teacher = distiller.teacher_forward(inputs)
    by_hand = 0.5 * affinity_loss(out.student.decoded_bev.detach(), teacher.decoded_bev)
    assert out.losses["kd/relational"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert by_hand.item() > 0
    decoder = list(distiller.student.decoder.parameters())
    grads = torch.autograd.grad(out.losses["kd/relational"], decoder, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert not distiller.teacher.training and all(p.grad is None for p in distiller.teacher.parameters())
    without = _distiller(configs, method, levels=("fld", "dld"), **options)
    assert "kd/relational" not in without(inputs, labels).losses


# ------------------------------------------------------------- corrections: gradient routing


@pytest.mark.parametrize("mutual", [False, True])
def test_dual_path_gradients_by_hand(mutual):
    """L_t2ta moves the TA, L_ta2s the student; only the mutual variant lets L_ta2s move the TA."""
    s, a, t = (x.requires_grad_(True) for x in _maps(4))
    eps = 0.7
    loss, _ = dual_path_loss(s, a, t, epsilon=eps, mutual=mutual)
    loss.backward()
    cells = s.shape[0] * s.shape[2] * s.shape[3]
    s_, a_, t_ = s.detach(), a.detach(), t.detach()
    assert torch.allclose(s.grad, (1 + eps) * 2 * (s_ - a_) / cells, atol=1e-6)
    expected_a = (1 + 1 / eps) * 2 * (a_ - t_) / cells
    if mutual:
        expected_a = expected_a + (1 + eps) * 2 * (a_ - s_) / cells
    assert torch.allclose(a.grad, expected_a, atol=1e-6)
    assert t.grad is None  # the teacher side is always a target


def _grads(loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


@pytest.mark.parametrize("mutual", [False, True])
def test_ta2s_trains_the_student_only_unless_mutual(configs, mutual):
    """At DLD the TA's gradient is that of (1 + 1/eps) L_t2ta alone; mutual adds L_ta2s's pull."""
    eps = 0.5
    distiller = _distiller(
        configs, levels=("dld",), epsilon="fixed", epsilon_fixed=eps, ta_mutual=mutual,
        weights=LevelWeights(dld=1.0), ta_seg_weight=0.0,
    )
    inputs, labels = _batch(configs)
    assistant = list(distiller.assistant.parameters())
    student_decoder = list(distiller.student.decoder.parameters())
    out = distiller(inputs, labels)
    ta_grads = _grads(out.losses["kd/dld"], assistant)
    assert any(g.abs().sum() > 0 for g in _grads(out.losses["kd/dld"], student_decoder))

    student = distiller.student(inputs)
    teacher = distiller.teacher_forward(inputs)
    ta = distiller.assistant_forward(student, teacher)
    t2ta_only = _grads((1 + 1 / eps) * cell_mse(ta.decoded_bev, teacher.decoded_bev), assistant)
    same = all(torch.allclose(g, r, atol=1e-6, rtol=1e-4) for g, r in zip(ta_grads, t2ta_only))
    assert same != mutual


def test_ta_from_teacher_computes_the_teachers_maps(configs):
    distiller = _distiller(configs, ta_init="teacher", teacher_precision="fp32")
    scratch = _distiller(configs, ta_init="scratch", teacher_precision="fp32")
    inputs, _ = _batch(configs)
    distiller.eval(), scratch.eval()
    teacher = distiller.teacher_forward(inputs)
    with torch.no_grad():
        ta = distiller.assistant(teacher.lidar_bev, teacher.camera_bev)  # the TA reads [lidar, camera]
        fresh = scratch.assistant(teacher.lidar_bev, teacher.camera_bev)
    assert torch.allclose(ta.fused_bev, teacher.fused_bev, atol=1e-5)
    assert torch.allclose(ta.decoded_bev, teacher.decoded_bev, atol=1e-4)
    assert torch.allclose(ta.logits, teacher.logits, atol=1e-4)
    assert not torch.allclose(fresh.logits, teacher.logits, atol=1e-2)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_crosskd_probe_mode(configs, mode):
    """The default probe through the TA head uses its running BatchNorm statistics."""
    distiller = _distiller(configs, ta_probe_mode=mode)
    inputs, _ = _batch(configs)
    distiller.train()
    head = distiller.assistant.head
    with torch.no_grad():  # running statistics that differ from any batch's
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    student = distiller.student(inputs)
    teacher = distiller.teacher_forward(inputs)
    ta = distiller.assistant_forward(student, teacher)
    value = distiller.crosskd_aux(student, teacher, ta)
    assert head.training  # restored after the probe
    head.eval()
    with torch.no_grad():
        eval_probe = head(student.decoded_bev)
    head.train()
    reference = bernoulli_kl(teacher.logits, distiller.teacher.head(student.decoded_bev)) + bernoulli_kl(
        ta.logits, eval_probe
    )
    assert torch.isclose(value, reference, rtol=1e-5) == (mode == "eval")


def test_ta_segmentation_only_ablation_has_no_kd_terms(configs):
    distiller = _distiller(configs, levels=())
    inputs, labels = _batch(configs)
    out = distiller(inputs, labels)
    assert {k.split("/")[0] for k in out.losses} == {"seg", "ta_seg"}
    ta_seg = sum(v for k, v in out.losses.items() if k.startswith("ta_seg/"))
    ta_seg.backward()  # the TA's own loss reaches the student's camera encoder (default switch)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.camera_encoder.parameters())
    assert all(p.grad is None for p in distiller.student.decoder.parameters())
    assert all(p.grad is not None for p in distiller.assistant.head.parameters())


def test_crosskd_term_has_its_own_weight(configs):
    one = _distiller(configs, weights=LevelWeights(lld=1.0, lld_aux=1.0))
    other = _distiller(configs, weights=LevelWeights(lld=1.0, lld_aux=0.25))
    inputs, labels = _batch(configs)
    a, b = one(inputs, labels), other(inputs, labels)
    assert torch.isclose(b.losses["kd/lld_aux"], 0.25 * a.losses["kd/lld_aux"], rtol=1e-5)
    assert torch.isclose(b.losses["kd/lld"], a.losses["kd/lld"], rtol=1e-5)


def test_tiny_camera_bev_is_normalised_like_the_fused_bev(configs):
    """tiny-c's F_cam passes a conv-BN-ReLU (vtransform.normalize): comparable with F_fus."""
    student, teacher = _models(configs)
    inputs, _ = _batch(configs)
    out = student(inputs)
    assert out.camera_bev.min() >= 0  # ReLU output, like the fuser's
    channel_std = out.camera_bev.transpose(0, 1).flatten(1).std(dim=1)
    assert channel_std.mean() < 2  # BN-scaled, not a raw sum over depth bins


def test_teacher_precision_returns_float32_maps_close_to_fp32():
    # The narrow pair of the engine tests: bf16 is emulated, and slow, on a CPU without it.
    from engine_helpers import SMALL_TINY_C, SMALL_TINY_LC

    small = (load_config("tiny-c", SMALL_TINY_C), load_config("tiny-lc", SMALL_TINY_LC))
    exact = _distiller(small, teacher_precision="fp32")
    low = _distiller(small, teacher_precision="bf16")
    low.teacher.load_state_dict(exact.teacher.state_dict())
    torch.manual_seed(1)
    inputs = reference_inputs(1, (32, 88), 6, with_lidar=True, points_per_sample=3000)
    reference, approximate = exact.teacher_forward(inputs), low.teacher_forward(inputs)
    for name in ("camera_bev", "lidar_bev", "fused_bev", "decoded_bev", "logits"):
        value = getattr(approximate, name)
        assert value.dtype == torch.float32, name
        assert not value.requires_grad
    # bf16 keeps 8 bits of mantissa: the probabilities move by far less than a threshold step.
    difference = (approximate.logits.sigmoid() - reference.logits.sigmoid()).abs()
    assert 0 < difference.max() < 0.05 and difference.mean() < 5e-3
