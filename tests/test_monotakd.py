"""MonoTAKD: deformable convolution against a plain reference, the LiDAR-depth lift against LSS
with a delta depth distribution, projected depth, the residual target, the distiller's gradient
routing (IMD's gradient reaches the student, where the public code's sends none), the TA stage's
imitation of the teacher, and the residual branch without FFM at inference and export."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bridgeta.config import DistillConfig, MonoTAKDConfig, load_config
from bridgeta.distill import FeatureKDDistiller, build_distiller, cell_mse
from bridgeta.distill.monotakd import MonoTAKDDistiller, assistant_config, minmax_per_sample, residual_target
from bridgeta.engine.model_file import export_student, read_model_file, save_model_file
from bridgeta.geometry import BEVGrid, project_depth
from bridgeta.models.bev_model import build_model
from bridgeta.models.lss import LSSViewTransform, lidar_depth_distribution, pool_sparse_depth
from bridgeta.models.residual import DeformConv2d, deform_conv2d
from bridgeta.models.types import CameraInputs
from bridgeta.rig import reference_inputs

# ------------------------------------------------------------------------ deformable conv


def _bilinear(x: torch.Tensor, y: float, xpos: float) -> torch.Tensor:
    """``x`` ``(C, H, W)`` at a real position, corners outside the map counting 0 (a plain loop)."""
    channels, height, width = x.shape
    y0, x0 = math.floor(y), math.floor(xpos)
    out = torch.zeros(channels, dtype=x.dtype)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (xpos - x0)), (x0 + 1, xpos - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out = out + wy * wx * x[:, yy, xx]
    return out


def _reference_deform_conv(x, offset, weight, bias, padding):
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out = torch.zeros(batch, out_channels, height + 2 * padding - kh + 1, width + 2 * padding - kw + 1, dtype=x.dtype)
    for b in range(batch):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                acc = bias.clone() if bias is not None else torch.zeros(out_channels, dtype=x.dtype)
                for ki in range(kh):
                    for kj in range(kw):
                        k = ki * kw + kj
                        y = i - padding + ki + float(offset[b, 2 * k, i, j])
                        xpos = j - padding + kj + float(offset[b, 2 * k + 1, i, j])
                        acc = acc + weight[:, :, ki, kj] @ _bilinear(x[b], y, xpos)
                out[b, :, i, j] = acc
    return out


def test_deform_conv_with_zero_offsets_is_a_convolution():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 3, 6, 7), torch.randn(4, 3, 3, 3), torch.randn(4)
    offset = torch.zeros(2, 18, 6, 7)
    assert torch.allclose(deform_conv2d(x, offset, weight, bias, padding=1), F.conv2d(x, weight, bias, padding=1), atol=1e-5)


def test_deform_conv_samples_at_exact_positions_under_bf16_autocast():
    """Under autocast (bf16 on CPUs with native bf16, as training runs) the sampling positions
    stay exact: with zero offsets and an identity kernel the layer returns its input on a
    128-wide BEV, up to bf16's rounding of the values. Positions computed in bf16 (0.5 px apart
    near x = 100) blurred each column by up to a quarter pixel."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 128)
    weight = torch.zeros(4, 4, 3, 3)
    weight[range(4), range(4), 1, 1] = 1.0  # the centre tap of each channel: an identity
    offset = torch.zeros(1, 18, 8, 128, dtype=torch.bfloat16)  # as the offset conv gives it under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x, offset, weight, padding=1)
    assert (out.float() - x).abs().max() < 0.05  # bf16 rounds values to ~0.4 %; the blur gave ~1


def test_deform_conv_matches_a_plain_bilinear_loop_in_value_and_gradient():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    offset = (2.5 * torch.randn(1, 18, 5, 6, dtype=torch.float64)).requires_grad_(False)
    ours = deform_conv2d(x, offset, weight, None, padding=1)
    reference = _reference_deform_conv(x, offset, weight, None, padding=1)
    assert torch.allclose(ours, reference, atol=1e-10)
    grads = torch.autograd.grad(ours.square().sum(), (x, weight))
    expected = torch.autograd.grad(reference.square().sum(), (x, weight))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-9)


def test_deform_conv_offset_gradient_matches_finite_differences():
    """The offsets' gradient (through the sampling grid: the part of the backward a plain loop with
    constant positions does not check) against central differences, in float64, with every sampling
    position kept 0.2 px or more from an integer (where bilinear sampling has a kink)."""
    torch.manual_seed(7)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    whole = torch.randint(-2, 3, (1, 18, 4, 5)).double()
    offset = (whole + 0.2 + 0.6 * torch.rand(1, 18, 4, 5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda o: deform_conv2d(x, o, weight, None, padding=1), (offset,), eps=1e-6, atol=1e-6)
    # Not vacuous: the positions move the output.
    grad = torch.autograd.grad(deform_conv2d(x, offset, weight, None, padding=1).square().sum(), offset)[0]
    assert grad.abs().sum() > 0


def test_deform_conv_layer_starts_as_a_convolution_and_learns_offsets():
    torch.manual_seed(2)
    layer = DeformConv2d(4, 5)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(layer(x), F.conv2d(x, layer.weight, None, padding=1), atol=1e-5)
    layer(x).square().sum().backward()
    assert layer.offset.weight.grad is not None and layer.offset.weight.grad.abs().sum() > 0
    assert set(dict(layer.named_parameters())) == {"weight", "offset.weight", "offset.bias"}


# ------------------------------------------------------------------------ LiDAR depth lift

IMAGE = (32, 48)
DEPTH = (1.0, 21.0, 1.0)  # 20 bins
GRID = BEVGrid((-25.6, 25.6, 0.8), (-25.6, 25.6, 0.8))


def _camera(depth: torch.Tensor | None) -> CameraInputs:
    rotation = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    ego_T_camera = torch.eye(4)
    ego_T_camera[:3, :3], ego_T_camera[:3, 3] = rotation, torch.tensor([1.0, 0.0, 1.5])
    intrinsics = torch.tensor([[30.0, 0.0, 23.5], [0.0, 30.0, 15.5], [0.0, 0.0, 1.0]])
    return CameraInputs(
        images=torch.zeros(1, 2, 3, *IMAGE), intrinsics=intrinsics.expand(1, 2, 3, 3).clone(),
        ego_T_camera=ego_T_camera.expand(1, 2, 4, 4).clone(), image_aug=torch.eye(3).expand(1, 2, 3, 3).clone(),
        depth=depth,
    )


def test_sparse_pooling_averages_only_the_pixels_with_depth():
    depth = torch.zeros(1, 4, 4)
    depth[0, 0, 0], depth[0, 1, 1] = 4.0, 6.0  # block (0, 0): two pixels with depth
    depth[0, 2:, 2:] = 10.0
    pooled = pool_sparse_depth(depth, 2)
    assert pooled.tolist() == [[[5.0, 0.0], [0.0, 10.0]]]


def test_lidar_lift_equals_lss_with_a_delta_depth_distribution():
    """The one-hot LiDAR lift is LSS whose softmax is exactly the one-hot of the pooled depth."""
    torch.manual_seed(3)
    depth = torch.rand(1, 2, *IMAGE) * 19.0 + 1.5  # every pixel measured, inside the bins
    lidar = LSSViewTransform(5, 4, IMAGE, 8, GRID, depth=DEPTH, depth_source="lidar")
    predicted = LSSViewTransform(5, 4, IMAGE, 8, GRID, depth=DEPTH)
    predicted.load_state_dict(lidar.state_dict())
    features = torch.randn(1, 2, 5, 4, 6)
    one_hot = lidar_depth_distribution(depth.view(2, *IMAGE), 8, DEPTH)
    assert torch.equal(one_hot.sum(dim=1), torch.ones(2, 4, 6))
    base = predicted.depthnet

    class Delta(torch.nn.Module):
        def forward(self, x):  # depth logits that make the softmax exactly this one-hot
            out = base(x)
            return torch.cat([1e4 * one_hot, out[:, one_hot.shape[1]:]], dim=1)

    predicted.depthnet = Delta()
    got, want = lidar(features, _camera(depth)), predicted(features, _camera(depth))
    assert torch.allclose(got.bev, want.bev, atol=1e-5) and got.bev.abs().sum() > 0
    # A cell with no depth lifts nothing: no softmax spreads it over the bins.
    empty = depth.clone()
    empty[:, :, :8, :8] = 0.0
    distribution = lidar_depth_distribution(empty.view(2, *IMAGE), 8, DEPTH)
    assert distribution[:, :, 0, 0].sum() == 0 and distribution[:, :, 1, 1].sum(dim=1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="no CameraInputs.depth"):
        lidar(features, _camera(None))


def test_lidar_depth_goes_to_the_nearest_frustum_bin():
    """Bin k of the frustum sits at depth min + k * step (DEPTH: 1 m, 2 m, ..., 20 m): a measured
    depth goes to the nearest one, and more than half a step outside the bins lifts nothing."""
    measured = torch.tensor([5.4, 5.6, 0.6, 0.4, 20.4, 20.6])
    depth = measured.view(1, 1, -1).repeat_interleave(8, dim=2).repeat(1, 8, 1)  # one 8x8 cell each
    distribution = lidar_depth_distribution(depth, 8, DEPTH)[0, :, 0]  # (D, cells)
    bins = [int(d.argmax()) if d.sum() > 0 else None for d in distribution.T]
    assert bins == [4, 5, 0, None, 19, None]


def test_feature_fusion_starts_as_the_identity_and_learns_from_the_first_step():
    from bridgeta.models.residual import FeatureFusion

    torch.manual_seed(4)
    ffm = FeatureFusion(6)
    camera, residual = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    fused = ffm(camera, residual)
    assert torch.equal(fused, camera)  # the decoder the student inherits from the TA reads its own BEV
    scale = torch.autograd.grad((fused * torch.randn_like(fused)).sum(), ffm.body[-1].weight)[0]
    assert scale.abs().min() > 0  # every channel of the residual path can open


def test_projected_depth_lands_on_the_expected_pixel_and_keeps_the_nearest():
    camera = _camera(None)
    # A point 10 m ahead of the camera, on its axis: pixel (23.5, 15.5) -> (row 15, column 23).
    points = torch.tensor([[11.0, 0.0, 1.5], [21.0, 0.0, 1.5], [-5.0, 0.0, 1.5]])
    depth = project_depth(points, camera.intrinsics[0], camera.ego_T_camera[0], camera.image_aug[0], IMAGE)
    assert depth.shape == (2, *IMAGE) and depth[0, 15, 23] == pytest.approx(10.0)
    assert torch.count_nonzero(depth[0]) == 1  # the far point is hidden, the one behind is not seen
    # Image augmentation moves the pixel: a 2x downscale puts it at (7, 11).
    half = torch.diag(torch.tensor([0.5, 0.5, 1.0])).expand(2, 3, 3)
    small = project_depth(points, camera.intrinsics[0], camera.ego_T_camera[0], half, (16, 24))
    assert small[0, 7, 11] == pytest.approx(10.0)


# ------------------------------------------------------------------------ losses


def test_minmax_and_residual_target_on_fixed_inputs():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]]], [[[2.0, 2.0], [2.0, 4.0]]]])
    scaled = minmax_per_sample(x, eps=0.0)
    assert scaled[0].flatten().tolist() == [0.0, 0.25, 0.5, 1.0]  # per sample, not per batch
    assert scaled[1].flatten().tolist() == [0.0, 0.0, 0.0, 1.0]
    # Inputs with a graph: the target must still have none (a missing no_grad would give it one).
    ta = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[0.0, 0.0], [4.0, 4.0]]]], requires_grad=True)  # normalised: [0, 0, 1, 1]
    target = residual_target(ta, teacher, threshold=0.6)
    # |[0, .25, .5, 1] - [0, 0, 1, 1]| = [0, .25, .5, 0]; peak .5, keep >= .3.
    assert target.flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0], abs=1e-6)
    assert target.grad_fn is None and not target.requires_grad
    # The absolute value: swapping the sides gives the same target (the public code's form).
    assert torch.equal(residual_target(teacher, ta, threshold=0.6), target)


# ------------------------------------------------------------------------ the distiller


@pytest.fixture(scope="module")
def models():
    student_config = load_config("distill/tiny-c-monotakd")
    torch.manual_seed(0)
    student = build_model(student_config)
    teacher = build_model(load_config("tiny-lc"))
    # Only the TA's network is built here; its run's teacher is never read.
    assistant = build_model(assistant_config(student_config, teacher="unread"))
    return student_config, student, teacher, assistant


@pytest.mark.parametrize("change", ["model.camera.vtransform.depth=[2.0,58.0,1.0]",  # 56 bins, other depths
                                    "model.grid={x: [-50.4, 52.0, 0.8], y: [-51.2, 51.2, 0.8]}"])  # shifted
def test_an_assistant_of_equal_shapes_on_other_geometry_is_refused(change):
    from bridgeta.distill.monotakd import assistant_config_check

    student_config = load_config("distill/tiny-c-monotakd")
    other = assistant_config(load_config("distill/tiny-c-monotakd", [change]), teacher="unread")
    student, assistant = build_model(student_config), build_model(other)
    # The shapes all agree (the old check passed them); the geometry does not.
    shared = {k: v.shape for k, v in student.state_dict().items()}
    assert all(assistant.state_dict()[k].shape == shape for k, shape in shared.items()
               if k.startswith(("camera_encoder.", "decoder.", "head.")))
    with pytest.raises(ValueError, match=change.split("=")[0]):
        assistant_config_check(student, assistant)
    assistant_config_check(student, build_model(assistant_config(student_config, teacher="unread")))


def _batch():
    torch.manual_seed(1)
    inputs = reference_inputs(1, (64, 176), 6, with_lidar=True, points_per_sample=3000)
    depth = torch.rand(1, 6, 64, 176) * 50.0
    depth[torch.rand_like(depth) > 0.3] = 0.0
    inputs.camera = replace(inputs.camera, depth=depth)
    return inputs, (torch.rand(1, 6, 100, 100) > 0.7).float()


def _distiller(models, teacher_precision: str = "auto", **settings) -> MonoTAKDDistiller:
    config, student, teacher, assistant = models
    student, teacher, assistant = (build_model(m.config) for m in (student, teacher, assistant))
    experiment = replace(config, distill=DistillConfig(method="monotakd", monotakd=MonoTAKDConfig(**settings),
                                                       teacher_precision=teacher_precision))
    distiller = build_distiller(experiment, student, teacher, assistant)
    assert isinstance(distiller, MonoTAKDDistiller)
    return distiller


def test_imd_reaches_the_students_camera_encoder(models):
    """The public code's IMD detaches both sides and trains nothing; ours trains the student."""
    distiller = _distiller(models, cmrd=0.0, logit=0.0)
    distiller.train()
    inputs, labels = _batch()
    out = distiller(inputs, labels)
    encoder = distiller.student.camera_encoder
    backbone = next(encoder.backbone.parameters())
    grads = torch.autograd.grad(out.losses["kd/imd"], [encoder.vtransform.depthnet.weight, backbone])
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("ta_source", ["frozen", "shared", "with_graph"])
def test_cmrd_target_is_a_constant_and_cmrd_trains_sam_but_not_ffm(models, ta_source, monkeypatch):
    """In ``shared`` mode the TA BEV comes from the student's own features: a target that kept its
    graph would send CMRD's gradient into the encoder through the target as well. ``with_graph``
    hands CMRD a TA BEV that does carry the student's graph, so only residual_target's own
    detachment stands between it and the encoder."""
    source = "shared" if ta_source == "with_graph" else ta_source
    distiller = _distiller(models, imd=0.0, logit=0.0, ta_source=source, init_from_assistant=source == "frozen")
    if ta_source == "with_graph":
        def with_graph(inputs, student=None):
            assert student is not None and student.camera_bev.requires_grad
            return 2.0 * student.camera_bev.float()
        monkeypatch.setattr(distiller, "assistant_bev", with_graph)
    distiller.train()
    inputs, labels = _batch()
    out = distiller(inputs, labels)
    cmrd = out.losses["kd/cmrd"]
    student = distiller.student
    encoder = [p for p in student.camera_encoder.parameters()]
    # The same loss with the target rebuilt and detached by hand: the gradients must be equal.
    target = residual_target(distiller.assistant_bev(inputs, out.student).detach(),
                             distiller.teacher_forward(inputs).fused_bev, 0.6)
    constant = 0.2 * F.mse_loss(out.student.residual_bev.float(), target.detach())
    assert constant.item() == pytest.approx(cmrd.item(), rel=1e-5)
    got = torch.autograd.grad(cmrd, encoder, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(constant, encoder, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or torch.allclose(g, w, rtol=1e-4, atol=1e-9))
    # CMRD reaches the whole residual branch: the 1x1 conv and SAM's ASPP, gate and offset conv.
    sam = student.residual_branch.sam
    parts = {"reduce": student.residual_branch.reduce[0].weight, "aspp": sam.aspp.branches[1][0].weight,
             "aspp_pool": sam.aspp.image_pool[1].weight, "gate": sam.gate[0].weight,
             "offset": sam.deform.offset.weight, "deform": sam.deform.weight, "refine": sam.refine[0].weight}
    grads = torch.autograd.grad(cmrd, list(parts.values()), retain_graph=True)
    assert {name: bool(g.abs().sum() > 0) for name, g in zip(parts, grads)} == dict.fromkeys(parts, True)
    # FFM sits after the residual branch: CMRD does not train it, the segmentation loss does.
    ffm = list(student.feature_fusion.parameters())
    assert all(g is None for g in torch.autograd.grad(cmrd, ffm, retain_graph=True, allow_unused=True))
    # FFM starts as the identity (its last BatchNorm's scale is zero, FeatureFusion), so at first
    # the segmentation loss reaches only that BatchNorm; once the scale moves, the convolutions too.
    last = student.feature_fusion.body[-1]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(out.total, [last.weight, last.bias]))


def test_teacher_and_frozen_assistant_get_no_gradient_and_no_batchnorm_update(models):
    distiller = _distiller(models)
    distiller.train()
    assert not distiller.teacher.training and not distiller.assistant.training
    buffers = {name: b.clone() for name, b in distiller.assistant.named_buffers()}
    teacher_buffers = {name: b.clone() for name, b in distiller.teacher.named_buffers()}
    inputs, labels = _batch()
    distiller(inputs, labels).total.backward()
    for module in (distiller.teacher, distiller.assistant):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in distiller.assistant.named_buffers())
    assert all(torch.equal(b, teacher_buffers[n]) for n, b in distiller.teacher.named_buffers())
    assert {p for p in distiller.learnable_parameters()} == set(distiller.student.parameters())
    assert not any(key.startswith(("teacher.", "assistant.")) for key in distiller.state_dict())
    # No graph even from frozen models whose weights did require gradients: the forwards run
    # without autograd, not merely on frozen weights.
    for module in (distiller.teacher, distiller.assistant):
        module.requires_grad_(True)
    try:
        fused = distiller.teacher_forward(inputs).fused_bev
        assistant = distiller.assistant_bev(inputs)
    finally:
        for module in (distiller.teacher, distiller.assistant):
            module.requires_grad_(False)
    assert fused.grad_fn is None and not fused.requires_grad
    assert assistant.grad_fn is None and not assistant.requires_grad


def test_the_frozen_ta_source_is_the_assistant_network_not_the_student(models):
    distiller = _distiller(models, teacher_precision="fp32")
    student, assistant = distiller.student, distiller.assistant
    torch.manual_seed(5)
    with torch.no_grad():  # the student starts from the TA: make its camera network differ
        for p in student.camera_encoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    distiller.train()
    inputs, _ = _batch()
    target = distiller.assistant_bev(inputs)
    with torch.no_grad():
        ta = assistant.camera_encoder(inputs.camera, inputs.bev_aug).bev
        student.camera_encoder.eval()
        students = student.camera_encoder(inputs.camera, inputs.bev_aug, depth_source="lidar").bev
    assert torch.allclose(target, ta, atol=1e-6) and target.abs().sum() > 0
    assert not torch.allclose(target, students, atol=1e-3)


def test_assistant_bev_runs_under_the_teachers_precision(models):
    """Inside a bf16 training step, the TA's forward follows distill.teacher_precision."""
    seen = []
    inputs, _ = _batch()
    for precision, expected in (("fp32", (False, None)), ("bf16", (True, torch.bfloat16))):
        distiller = _distiller(models, teacher_precision=precision)
        encoder = distiller.assistant.camera_encoder
        hook = encoder.register_forward_pre_hook(lambda *_: seen.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)))
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bev = distiller.assistant_bev(inputs)
        finally:
            hook.remove()
        assert seen[-1] == expected and bev.dtype == torch.float32


def test_the_student_starts_from_the_assistant_and_runs_its_branches_at_inference(models):
    distiller = _distiller(models)
    ours, theirs = distiller.student.state_dict(), distiller.assistant.state_dict()
    shared = [k for k in theirs if k.startswith(("camera_encoder.", "decoder.", "head."))]
    assert len(shared) == len(theirs) > 100  # the TA is exactly the student's shared networks
    assert all(torch.equal(ours[k], theirs[k]) for k in shared)
    assert any(k.startswith("residual_branch.sam.deform") for k in ours)
    distiller.student.eval()
    inputs, _ = _batch()
    with torch.no_grad():
        out = distiller.student(inputs)
    assert out.residual_bev is not None and out.residual_bev.shape == out.camera_bev.shape
    # FFM: the decoder reads the fusion of the camera BEV with the residual branch.
    fused = distiller.student.feature_fusion(out.camera_bev, out.residual_bev)
    assert torch.allclose(out.fused_bev, fused)


def test_without_ffm_the_residual_branch_trains_but_neither_runs_nor_exports_at_inference(models, tmp_path):
    config = load_config("distill/tiny-c-monotakd", ["model.residual.ffm=false"])
    torch.manual_seed(6)
    model = build_model(config)
    calls = []
    model.residual_branch.register_forward_hook(lambda *_: calls.append(1))
    inputs, _ = _batch()
    model.train()
    assert model(inputs).residual_bev is not None and calls == [1]  # CMRD reads it in training
    model.eval()
    with torch.no_grad():
        out = model(inputs)
    assert out.residual_bev is None and calls == [1]
    # The export is the network that runs: no residual branch, in the weights or the config.
    source = save_model_file(tmp_path / "run.safetensors", model, config)
    exported_path, exported = export_student(source, tmp_path / "student.safetensors")
    stored, state, _ = read_model_file(exported_path)
    assert stored.model.residual is None and exported.residual_branch is None
    assert not any(k.startswith("residual_branch.") for k in state) and len(state) > 100
    with torch.no_grad():
        assert torch.allclose(exported(inputs).logits, out.logits, atol=1e-6)


def test_shared_source_lifts_the_students_own_features_without_touching_its_statistics(models):
    """``shared``: the TA BEV is the student's own lift of this step's image features with the LiDAR
    depth, i.e. its training-mode encoder run with ``depth_source: lidar`` (batch statistics, as
    the student's own lift), but computed from the forward's features, with no second encoder
    pass and no change to any running statistic."""
    distiller = _distiller(models, ta_source="shared", init_from_assistant=False)
    assert distiller.assistant is None
    distiller.train()
    encoder = distiller.student.camera_encoder
    inputs, _ = _batch()
    before = {n: b.clone() for n, b in encoder.named_buffers()}
    out = distiller.student(inputs)
    after_forward = {n: b.clone() for n, b in encoder.named_buffers()}
    assert any(not torch.equal(b, before[n]) for n, b in after_forward.items())  # training mode: BN learns
    calls = []
    hook = encoder.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        target = distiller.assistant_bev(inputs, out)
    finally:
        hook.remove()
    assert calls == []  # the forward's own features: no second pass through the image network
    assert target.grad_fn is None and target.dtype == torch.float32
    # The lift's post-pool block normalised with batch statistics and left its running ones alone.
    assert all(torch.equal(b, after_forward[n]) for n, b in encoder.named_buffers())
    # The reference: the training-mode encoder lifting with LiDAR depth (its BN updates undone).
    with torch.no_grad():
        reference = encoder(inputs.camera, inputs.bev_aug, depth_source="lidar").bev
    for name, buffer in encoder.named_buffers():
        buffer.copy_(after_forward[name])
    assert torch.allclose(target, reference, atol=1e-5) and target.abs().sum() > 0
    # Not the eval-mode probe (running statistics): that differs by more than the depth.
    encoder.eval()
    with torch.no_grad():
        probe = encoder(inputs.camera, inputs.bev_aug, depth_source="lidar").bev
    encoder.train()
    assert not torch.allclose(target, probe, atol=1e-3)
    with pytest.raises(ValueError, match="pass student"):
        distiller.assistant_bev(inputs)


def test_settings_that_cannot_work_are_refused(models):
    config, student, teacher, assistant = models
    no_branch = build_model(load_config("tiny-c"))
    experiment = replace(load_config("tiny-c"), distill=DistillConfig(method="monotakd", monotakd=MonoTAKDConfig()))
    with pytest.raises(ValueError, match="residual branch"):
        build_distiller(experiment, no_branch, build_model(teacher.config), build_model(assistant.config))
    with pytest.raises(ValueError, match="needs its trained assistant"):
        build_distiller(replace(config, distill=DistillConfig(method="monotakd", monotakd=MonoTAKDConfig())),
                        build_model(student.config), build_model(teacher.config))
    with pytest.raises(ValueError, match="depth_source: lidar"):
        build_distiller(replace(config, distill=DistillConfig(method="monotakd", monotakd=MonoTAKDConfig())),
                        build_model(student.config), build_model(teacher.config), build_model(load_config("tiny-c")))


def test_a_residual_branch_without_a_reader_is_refused(models):
    """Without FFM only CMRD reads the residual branch: at cmrd 0 it would run and learn nothing."""
    _, _, teacher, assistant = models
    config = load_config("distill/tiny-c-monotakd", ["model.residual.ffm=false", "distill.monotakd.cmrd=0"])
    with pytest.raises(ValueError, match="model.residual without ffm"):
        build_distiller(config, build_model(config), build_model(teacher.config), build_model(assistant.config))
    # The IMD-only ablation's form (no branch) and FFM's reader are both accepted.
    for overrides in (["model.residual=null", "distill.monotakd.cmrd=0"], ["distill.monotakd.cmrd=0"]):
        ok = load_config("distill/tiny-c-monotakd", overrides)
        build_distiller(ok, build_model(ok), build_model(teacher.config), build_model(assistant.config))


@pytest.mark.parametrize("weights, runs_teacher", [
    ({"imd": 0.0, "cmrd": 0.0, "logit": 0.0}, False),  # the sweep's lambda = 0
    ({"imd": 1.0, "cmrd": 0.0, "logit": 0.0}, False),  # IMD only: the assistant, not the teacher
    ({"imd": 0.0, "cmrd": 0.0, "logit": 1.0}, True),
    ({"imd": 0.0, "cmrd": 0.2, "logit": 0.0}, True),
], ids=["zero", "imd", "logit", "cmrd"])
def test_the_teacher_runs_only_for_the_terms_that_read_it(models, weights, runs_teacher):
    distiller = _distiller(models, **weights)
    calls = []
    distiller.teacher.register_forward_hook(lambda *_: calls.append(1))
    distiller.train()
    inputs, labels = _batch()
    out = distiller(inputs, labels)
    assert bool(calls) == runs_teacher
    # Nor does the batch carry the teacher's LiDAR sweeps then: the TA's depth is enough.
    expected = {"camera", "depth"} | ({"lidar"} if runs_teacher else set())
    assert set(distiller.input_modalities) == expected
    assert {k for k in out.losses if k.startswith("kd/")} == {f"kd/{k}" for k, w in weights.items() if w > 0}


@pytest.mark.parametrize("teacher, wrong", [
    ("tiny-l", "64 channels"),  # no fuser: the LiDAR branch's BEV is the fused BEV
    ("tiny-lc", "32 channels on the grid x [-51.2, 51.2, 1.6]"),  # same channels, a coarser grid
], ids=["channels-without-fuser", "grid"])
def test_cmrd_refuses_a_teacher_bev_that_does_not_match_the_students(models, teacher, wrong):
    config, student, _, assistant = models
    overrides = ["model.grid.x=[-51.2,51.2,1.6]", "model.grid.y=[-51.2,51.2,1.6]"] if teacher == "tiny-lc" else []
    experiment = replace(config, distill=DistillConfig(method="monotakd", monotakd=MonoTAKDConfig()))
    with pytest.raises(ValueError, match=f"CMRD compares the teacher's fused BEV \\({re.escape(wrong)}"):
        build_distiller(experiment, build_model(student.config), build_model(load_config(teacher, overrides)),
                        build_model(assistant.config))
    # Without CMRD nothing compares the two maps (the IMD-only row reads the teacher's logits).
    ablated = replace(config, distill=DistillConfig(method="monotakd", monotakd=MonoTAKDConfig(cmrd=0.0)))
    build_distiller(ablated, build_model(student.config), build_model(load_config(teacher, overrides)),
                    build_model(assistant.config))


# ------------------------------------------------------------------------ the TA stage


def test_the_assistant_imitates_the_teachers_fused_bev_into_its_camera_branch_only(models):
    """train-assistant's TA: the feature_kd loss on the TA network, so its channels learn the
    teacher's feature space (what CMRD's channel-wise residual needs); the teacher learns nothing."""
    _, _, teacher, _ = models
    config = assistant_config(load_config("distill/tiny-c-monotakd", ["distill.monotakd.assistant_imitation=0.5"]),
                              teacher="runs/teacher")
    assert config.distill.method == "feature_kd" and config.distill.teacher == "runs/teacher"
    assert config.distill.monotakd is None and config.model.residual is None
    assert config.model.camera.vtransform.depth_source == "lidar"
    torch.manual_seed(7)
    distiller = build_distiller(replace(config, distill=replace(config.distill, teacher_precision="fp32")),
                                build_model(config), build_model(teacher.config))
    assert isinstance(distiller, FeatureKDDistiller)
    distiller.train()
    teacher_buffers = {n: b.clone() for n, b in distiller.teacher.named_buffers()}
    inputs, labels = _batch()
    out = distiller(inputs, labels)
    imitation = out.losses["kd/feature"]
    fused = distiller.teacher_forward(inputs).fused_bev
    assert imitation.item() == pytest.approx(0.5 * cell_mse(out.student.camera_bev, fused).item(), rel=1e-5)
    encoder = distiller.student.camera_encoder
    branch = {"backbone": next(encoder.backbone.parameters()), "neck": next(encoder.neck.parameters()),
              "depthnet": encoder.vtransform.depthnet.weight}
    grads = torch.autograd.grad(imitation, list(branch.values()), retain_graph=True)
    assert {name: bool(g.abs().sum() > 0) for name, g in zip(branch, grads)} == dict.fromkeys(branch, True)
    # The decoder and head are after the camera BEV: the imitation term does not reach them.
    assert all(g is None for g in torch.autograd.grad(imitation, list(distiller.student.head.parameters()),
                                                       retain_graph=True, allow_unused=True))
    out.total.backward()
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert all(torch.equal(b, teacher_buffers[n]) for n, b in distiller.teacher.named_buffers())
    assert set(distiller.learnable_parameters()) == set(distiller.student.parameters())


def test_the_assistant_needs_the_teacher_unless_its_imitation_is_off():
    recipe = load_config("distill/tiny-c-monotakd")
    with pytest.raises(ValueError, match="assistant_imitation is 1.*pass --teacher"):
        assistant_config(recipe)
    label_only = assistant_config(load_config("distill/tiny-c-monotakd", ["distill.monotakd.assistant_imitation=0"]))
    assert label_only.distill is None and label_only.model.camera.vtransform.depth_source == "lidar"
    # A recipe that names its teacher is enough; --teacher wins over it.
    named = load_config("distill/tiny-c-monotakd", ["distill.teacher=runs/t"])
    assert assistant_config(named).distill.teacher == "runs/t"
    assert assistant_config(named, teacher="runs/other").distill.teacher == "runs/other"
