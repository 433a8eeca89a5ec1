"""BEVDepth's camera-aware DepthNet (``model.camera.vtransform.depth_net.type: camera_aware``): its
camera inputs in BEVDepth's order, that it reads the camera (a depth that only the camera
parameters determine is learnable by it and not by the 1x1 conv), where its gradient goes, and
the model and config around it."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import torch_threads

from bridgeta.config import ConfigError, load_config
from bridgeta.models.bev_model import build_model
from bridgeta.models.depth_net import NUM_CAMERA_PARAMETERS, CameraAwareDepthNet, camera_parameters
from bridgeta.rig import reference_inputs


def _cameras(batch: int = 2, cams: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    intrinsics = torch.eye(3).repeat(batch, cams, 1, 1)
    intrinsics[..., 0, 0] = 100 + torch.rand(batch, cams, generator=generator)
    intrinsics[..., 1, 1] = 110 + torch.rand(batch, cams, generator=generator)
    intrinsics[..., 0, 2], intrinsics[..., 1, 2] = 80.0, 40.0
    image_aug = torch.eye(3).repeat(batch, cams, 1, 1) + 0.1 * torch.rand(batch, cams, 3, 3, generator=generator)
    image_aug[..., 2, :] = torch.tensor([0.0, 0.0, 1.0])
    ego_T_camera = torch.eye(4).repeat(batch, cams, 1, 1)
    ego_T_camera[..., :3, :] += torch.rand(batch, cams, 3, 4, generator=generator)
    bev_aug = torch.eye(4).repeat(batch, 1, 1)
    angle = torch.tensor(0.3)
    bev_aug[:, :2, :2] = torch.tensor([[angle.cos(), -angle.sin()], [angle.sin(), angle.cos()]])
    bev_aug[:, :3, :3] *= 1.05
    return intrinsics, image_aug, ego_T_camera, bev_aug


def test_camera_parameters_are_bevdepths_27_in_its_order():
    intrinsics, image_aug, ego_T_camera, bev_aug = _cameras()
    parameters = camera_parameters(intrinsics, image_aug, ego_T_camera, bev_aug)
    assert parameters.shape == (2, 3, NUM_CAMERA_PARAMETERS)
    b, n = 1, 2
    K, A, E, B = intrinsics[b, n], image_aug[b, n], ego_T_camera[b, n], bev_aug[b]
    expected = [K[0, 0], K[1, 1], K[0, 2], K[1, 2], A[0, 0], A[0, 1], A[0, 2], A[1, 0], A[1, 1], A[1, 2],
                B[0, 0], B[0, 1], B[1, 0], B[1, 1], B[2, 2], *E[:3, :].reshape(-1)]
    assert torch.equal(parameters[b, n], torch.stack(expected))
    # Without a BEV augmentation its entries are the identity's.
    plain = camera_parameters(intrinsics, image_aug, ego_T_camera, None)
    assert plain[..., 10:15].tolist() == [[[1.0, 0.0, 0.0, 1.0, 1.0]] * 3] * 2


def test_only_the_camera_aware_net_learns_a_depth_that_the_camera_decides():
    """Identical features on every camera; the target depth bin is set by the camera's focal
    length. The 1x1 conv sees the same input everywhere and cannot do better than the average;
    the camera-aware net reads fy and fits the bins."""
    torch.manual_seed(0)
    cams, bins = 4, 6
    features = torch.ones(cams, 8, 3, 5)
    intrinsics = torch.eye(3).repeat(1, cams, 1, 1)
    intrinsics[..., 0, 0] = intrinsics[..., 1, 1] = torch.tensor([50.0, 100.0, 200.0, 400.0])
    parameters = camera_parameters(intrinsics, torch.eye(3).repeat(1, cams, 1, 1), torch.eye(4).repeat(1, cams, 1, 1), None)[0]
    target = torch.tensor([0, 2, 3, 5]).view(cams, 1, 1).expand(cams, 3, 5)

    def fit(net, forward) -> float:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(150):
            loss = torch.nn.functional.cross_entropy(forward()[:, :bins], target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    with torch_threads(1):
        aware = CameraAwareDepthNet(8, 16, bins, 4, blocks=1, aspp=False, deform=False)
        aware_loss = fit(aware, lambda: aware(features, parameters))
        conv = torch.nn.Conv2d(8, bins + 4, 1)
        conv_loss = fit(conv, lambda: conv(features))
        with torch.no_grad():  # and it keeps them with the running statistics
            predicted = aware.eval()(features, parameters)[:, :bins].argmax(dim=1)
    assert conv_loss > 1.0  # the average over 4 equally likely bins: log 4 = 1.39
    assert aware_loss < 0.1
    assert torch.equal(predicted, target)


def test_under_bf16_autocast_the_camera_parameters_stay_float32():
    """The camera parameters reach BatchNorm in float32 (bf16 would round a focal length of a
    few hundred pixels by up to a pixel): the autocast output follows the float32 one."""
    torch.manual_seed(0)
    net = CameraAwareDepthNet(8, 16, 5, 4, blocks=1, aspp=False, deform=False).eval()
    intrinsics, image_aug, ego_T_camera, bev_aug = _cameras(1, 3)
    parameters = camera_parameters(intrinsics, image_aug, ego_T_camera, bev_aug)[0]
    seen = []
    net.bn.register_forward_hook(lambda module, args, output: seen.append(args[0].dtype))
    features = torch.randn(3, 8, 6, 10)
    with torch.no_grad():
        reference = net(features, parameters)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(features.bfloat16(), parameters)
    assert seen == [torch.float32, torch.float32]
    assert torch.allclose(low.float(), reference, atol=0.1, rtol=0.05)


def test_gradient_reaches_both_gates_and_the_deformable_and_aspp_layers():
    torch.manual_seed(0)
    net = CameraAwareDepthNet(8, 16, 5, 4, blocks=2, aspp=True, deform=True)
    intrinsics, image_aug, ego_T_camera, bev_aug = _cameras(1, 3)
    parameters = camera_parameters(intrinsics, image_aug, ego_T_camera, bev_aug)[0]
    logits = net(torch.randn(3, 8, 6, 10), parameters)
    assert logits.shape == (3, 5 + 4, 6, 10)
    (logits[:, :5].softmax(1)[:, 0].sum() + logits[:, 5:].square().sum()).backward()
    for name in ("depth_mlp.0.weight", "depth_se.conv_expand.weight", "context_mlp.0.weight",
                 "context_se.conv_expand.weight", "reduce_conv.0.weight", "depth_conv.2.project.0.weight",
                 "depth_conv.3.weight", "context_conv.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="camera parameters must be"):
        net(torch.randn(3, 8, 6, 10), parameters[:, :20])


def test_a_camera_aware_model_runs_and_the_default_keeps_the_1x1_conv():
    aware = build_model(load_config("tiny-c", ["model.camera.vtransform.depth_net={type: camera_aware, mid_channels: 16, blocks: 1}"]))
    plain = build_model(load_config("tiny-c"))
    assert isinstance(plain.camera_encoder.vtransform.depthnet, torch.nn.Conv2d)
    keys = set(aware.state_dict())
    assert "camera_encoder.vtransform.depthnet.depth_mlp.0.weight" in keys
    assert "camera_encoder.vtransform.depthnet.bn.running_mean" in keys
    # The rest of the network is the baseline's.
    outside = {k for k in keys if ".depthnet." not in k}
    assert outside == {k for k in plain.state_dict() if ".depthnet." not in k}
    inputs = reference_inputs(1, tuple(aware.config.camera.image_size))
    with torch_threads(1), torch.no_grad():
        outputs = aware.eval()(inputs)
        inputs.camera.intrinsics[..., 1, 1] *= 1.2  # another focal length: another depth
        refocused = aware(inputs)
    assert outputs.depth.shape[2] == aware.camera_encoder.vtransform.num_depth_bins
    assert not torch.allclose(outputs.depth, refocused.depth)


@pytest.mark.parametrize("setting, message", [
    ("{type: cnn}", "depth_net.type"),
    ("{type: camera_aware, blocks: -1}", "blocks >= 0"),
    ("{type: camera_aware, mid_channels: 0}", "mid_channels must be >= 1"),
    ("{type: camera_aware, width: 3}", "width"),
])
def test_bad_depth_net_settings_are_config_errors(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-c", [f"model.camera.vtransform.depth_net={setting}"])


def test_a_lidar_depth_lift_or_a_single_camera_refuses_the_camera_aware_net():
    aware = "model.camera.vtransform.depth_net={type: camera_aware}"
    with pytest.raises(ConfigError, match="depth_source 'lidar'"):
        load_config("tiny-c", [aware, "model.camera.vtransform.depth_source=lidar"])
    with pytest.raises(ConfigError, match="num_cameras >= 2"):
        load_config("tiny-c", [aware, "model.camera.num_cameras=1"])
    # One key by its dotted path keeps the rest of the mapping.
    config = load_config("tiny-c", [aware, "model.camera.vtransform.depth_net.blocks=1"])
    assert (config.model.camera.vtransform.depth_net.type, config.model.camera.vtransform.depth_net.blocks) == ("camera_aware", 1)
