"""``BEVModel``: optional camera and LiDAR encoders, fuser, decoder and map head.

One class covers the camera-only baseline (BEVFusion-C), the LiDAR-camera fusion teacher and the
LiDAR-only model; which branches exist is decided by the config. ``forward`` returns
:class:`BEVOutputs` so distillers can read every level by name.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from torch import nn

from bridgeta.config import CameraEncoderConfig, DepthNetConfig, ExperimentConfig, ModelConfig
from bridgeta.geometry import BEVGrid
from bridgeta.models.backbones import build_backbone
from bridgeta.models.checkpoint import load_pretrained
from bridgeta.models.decoder import BEVDecoder
from bridgeta.models.fuser import ConvFuser
from bridgeta.models.motion_head import MotionHead, PlanningHead
from bridgeta.models.object_head import ObjectHead
from bridgeta.models.occupancy_head import OccupancyHead
from bridgeta.models.residual import FeatureFusion, ResidualBranch
from bridgeta.models.head import MapSegmentationHead
from bridgeta.models.lidar import PillarEncoder
from bridgeta.models.lss import LSSOutput, LSSViewTransform, depth_supervision_loss
from bridgeta.models.neck import GeneralizedLSSFPN
from bridgeta.models.types import BEVInputs, BEVOutputs, CameraInputs

log = logging.getLogger(__name__)


def _depth_net_arguments(config: DepthNetConfig) -> dict | None:
    """LSSViewTransform's ``depth_net``: None for BEVFusion's 1x1 conv."""
    if config.type == "conv":
        return None
    return {key: value for key, value in asdict(config).items() if key != "type"}


class CameraEncoder(nn.Module):
    """Images -> backbone -> GeneralizedLSSFPN -> LSS lift-splat -> camera BEV (``F_cam``)."""

    def __init__(self, config: CameraEncoderConfig, grid: BEVGrid) -> None:
        super().__init__()
        self.image_size = tuple(config.image_size)
        self.num_cameras = config.num_cameras
        self.backbone = build_backbone(
            config.backbone.type, config.backbone.out_indices, config.backbone.drop_path_rate
        )
        self.neck = GeneralizedLSSFPN(list(self.backbone.out_channels), config.neck.out_channels)
        # The neck returns one map per backbone level except the deepest (fused into the others).
        neck_strides = list(self.backbone.out_strides[:-1])
        stride = config.vtransform.feature_stride
        if stride not in neck_strides:
            raise ValueError(
                f"vtransform.feature_stride {stride} is not a neck output stride {neck_strides}; "
                "choose backbone.out_indices so that this stride is produced"
            )
        self.neck_level = neck_strides.index(stride)
        self.vtransform = LSSViewTransform(
            in_channels=config.neck.out_channels,
            out_channels=config.vtransform.out_channels,
            image_size=self.image_size,
            feature_stride=stride,
            grid=grid,
            depth=config.vtransform.depth,
            downsample=config.vtransform.downsample,
            normalize=config.vtransform.normalize,
            depth_source=config.vtransform.depth_source,
            depth_net=_depth_net_arguments(config.vtransform.depth_net),
        )
        self.out_channels = self.vtransform.out_channels
        self.output_grid = self.vtransform.output_grid
        if config.backbone.pretrained:
            report = load_pretrained(
                self.backbone,
                config.backbone.pretrained,
                ignore=getattr(self.backbone, "pretrained_ignore", ()),
            )
            log.info("camera backbone: %s", report.summary())
        if config.pretrained:
            # backbone.*, neck.* and vtransform.depthnet.* of a lift-depth pretraining; the rest
            # (the post-pool conv) has nothing to start from and is reported missing.
            report = load_pretrained(self, config.pretrained)
            log.info("camera encoder: %s", report.summary())

    def forward(
        self, camera: CameraInputs, bev_aug: torch.Tensor | None, depth_source: str | None = None
    ) -> LSSOutput:
        images = camera.images
        batch, cams, _, height, width = images.shape
        if (height, width) != self.image_size:
            raise ValueError(f"camera images are {height}x{width}, the model expects {self.image_size}")
        features = self.backbone(images.flatten(0, 1))
        level = self.neck(features)[self.neck_level]
        level = level.unflatten(0, (batch, cams))
        return self.vtransform(level, camera, bev_aug, depth_source)


class BEVModel(nn.Module):
    """A BEV map-segmentation model; see :class:`BEVOutputs` for what it returns."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.grid.build()
        self.camera_encoder: CameraEncoder | None = None
        self.lidar_encoder: PillarEncoder | None = None
        branch_channels = []
        feature_grid: BEVGrid | None = None
        if config.camera is not None:
            self.camera_encoder = CameraEncoder(config.camera, grid)
            branch_channels.append(self.camera_encoder.out_channels)
            feature_grid = self.camera_encoder.output_grid
        if config.lidar is not None:
            lidar = config.lidar
            self.lidar_encoder = PillarEncoder(
                grid,
                point_features=lidar.point_features,
                z_range=lidar.z_range,
                pillar_channels=lidar.pillar_channels,
                channels=tuple(lidar.channels),
                out_channels=lidar.out_channels,
                downsample=lidar.downsample,
            )
            branch_channels.append(self.lidar_encoder.out_channels)
            feature_grid = self.lidar_encoder.output_grid
        assert feature_grid is not None  # validate() guarantees at least one branch
        self.feature_grid = feature_grid

        # MonoTAKD's student modules: a residual branch on F_cam and, optionally, its fusion into
        # the decoder's input (camera-only models; validate() checks it).
        self.residual_branch: ResidualBranch | None = None
        self.feature_fusion: FeatureFusion | None = None
        if config.residual is not None:
            if self.camera_encoder is None or self.lidar_encoder is not None:
                raise ValueError("model.residual (MonoTAKD's student branch) needs a camera-only model")
            self.residual_branch = ResidualBranch(self.camera_encoder.out_channels, sam=config.residual.sam)
            if config.residual.ffm:
                self.feature_fusion = FeatureFusion(self.camera_encoder.out_channels)

        self.fuser: ConvFuser | None = None
        if config.fuser is not None:
            self.fuser = ConvFuser(branch_channels, config.fuser.out_channels)
            decoder_in = config.fuser.out_channels
        else:
            decoder_in = branch_channels[0]

        self.decoder = BEVDecoder(
            decoder_in,
            list(config.decoder.blocks),
            in_indices=config.decoder.in_indices,
            out_channels=config.decoder.out_channels,
            scale_factor=config.decoder.scale_factor,
        )
        if abs(self.decoder.output_scale - 1.0) > 1e-9:
            raise ValueError(
                "the decoder must return F_dec on the fused BEV grid (stride product of the "
                f"shallow neck input / scale_factor = 1), got scale {self.decoder.output_scale}"
            )
        self.classes = tuple(config.heads.map.classes)
        self.output_grid = config.heads.map.output_grid.build()
        self.head = MapSegmentationHead(
            config.decoder.out_channels, feature_grid, self.output_grid, len(self.classes)
        )
        # The second task: 3D objects on the decoded BEV's own grid (CenterPoint-style).
        self.object_head: ObjectHead | None = None
        self.object_classes: tuple[str, ...] = ()
        if config.heads.object is not None:
            self.object_classes = tuple(config.heads.object.classes)
            self.object_head = ObjectHead(config.decoder.out_channels, len(self.object_classes), feature_grid,
                                          config.heads.object.head_channels)
        # TinyBEV's further tasks on the same BEV: the agents' futures and the ego's plan.
        self.motion_head: MotionHead | None = None
        if config.heads.motion is not None:
            m = config.heads.motion
            self.motion_head = MotionHead(config.decoder.out_channels, m.modes, m.steps, m.head_channels)
        self.occupancy_head: OccupancyHead | None = None
        if config.heads.occupancy is not None:
            o = config.heads.occupancy
            self.occupancy_head = OccupancyHead(config.decoder.out_channels, o.steps, o.head_channels)
        self.planning_head: PlanningHead | None = None
        if config.heads.plan is not None:
            p = config.heads.plan
            self.planning_head = PlanningHead(config.decoder.out_channels, p.steps, p.head_channels, p.hidden)

    @property
    def head_names(self) -> tuple[str, ...]:
        """The model's heads by name: ``map`` always, then ``object``, ``motion`` and ``plan`` when
        configured (``model.heads.object``, ``.motion``, ``.occupancy``, ``.plan``)."""
        present = {"object": self.object_head, "motion": self.motion_head, "occupancy": self.occupancy_head,
                   "plan": self.planning_head}
        return ("map", *(name for name, head in present.items() if head is not None))

    @property
    def modalities(self) -> tuple[str, ...]:
        names = []
        if self.camera_encoder is not None:
            names.append("camera")
            if self.camera_encoder.vtransform.depth_source == "lidar":
                names.append("depth")
        if self.lidar_encoder is not None:
            names.append("lidar")
        return tuple(names)

    @property
    def training_modalities(self) -> tuple[str, ...]:
        """What a training batch must carry: the inputs, plus the projected LiDAR depth that depth
        supervision (``vtransform.depth_loss_weight``) reads as its target."""
        names = self.modalities
        if self.depth_loss_weight > 0 and "depth" not in names:
            names = (*names, "depth")
        return names

    @property
    def depth_loss_weight(self) -> float:
        return self.config.camera.vtransform.depth_loss_weight if self.camera_encoder is not None else 0.0

    def depth_losses(self, outputs: BEVOutputs, inputs: BEVInputs) -> dict[str, torch.Tensor]:
        """``{"depth/bce": weight x BEVDepth's depth loss}`` of a batch with depth supervision on,
        else ``{}``. ``outputs`` are this model's on ``inputs``."""
        weight = self.depth_loss_weight
        if weight <= 0:
            return {}
        if inputs.camera is None or inputs.camera.depth is None:
            raise ValueError("model.camera.vtransform.depth_loss_weight > 0 needs the projected LiDAR depth "
                             "(CameraInputs.depth) in the training batch: load the 'depth' modality")
        lss = self.camera_encoder.vtransform
        return {"depth/bce": weight * depth_supervision_loss(outputs.depth, inputs.camera.depth,
                                                             lss.feature_stride, lss.depth_bounds)}

    def encode(self, inputs: BEVInputs) -> tuple[LSSOutput | None, torch.Tensor | None]:
        """Per-modality features: the camera lift's (``F_cam``, its depth and context) and ``F_lid``."""
        lifted = lidar_bev = None
        if self.camera_encoder is not None:
            if inputs.camera is None:
                raise ValueError("this model has a camera branch but the batch has no camera inputs")
            lifted = self.camera_encoder(inputs.camera, inputs.bev_aug)
        if self.lidar_encoder is not None:
            if inputs.lidar is None:
                raise ValueError("this model has a LiDAR branch but the batch has no LiDAR points")
            lidar_bev = self.lidar_encoder(inputs.lidar, inputs.batch_size)
        return lifted, lidar_bev

    def fuse(self, camera_bev: torch.Tensor | None, lidar_bev: torch.Tensor | None) -> torch.Tensor:
        if self.fuser is not None:
            return self.fuser([camera_bev, lidar_bev])
        fused = camera_bev if camera_bev is not None else lidar_bev
        assert fused is not None
        return fused

    def forward(self, inputs: BEVInputs) -> BEVOutputs:
        lifted, lidar_bev = self.encode(inputs)
        camera_bev = lifted.bev if lifted is not None else None
        residual = None
        # Without FFM (the ``ffm: false`` ablation) only CMRD reads the residual branch, and only
        # in training: at inference nothing would read it, so it does not run.
        if self.residual_branch is not None and (self.training or self.feature_fusion is not None):
            assert camera_bev is not None
            residual = self.residual_branch(camera_bev)
        if self.feature_fusion is not None:
            fused = self.feature_fusion(camera_bev, residual)
        else:
            fused = self.fuse(camera_bev, lidar_bev)
        decoded = self.decoder(fused)
        logits = self.head(decoded)
        objects = self.object_head(decoded) if self.object_head is not None else None
        motion = self.motion_head(decoded) if self.motion_head is not None else None
        occupancy = self.occupancy_head(decoded) if self.occupancy_head is not None else None
        plan = self.planning_head(decoded, inputs.ego_motion) if self.planning_head is not None else None
        return BEVOutputs(
            camera_bev=camera_bev,
            lidar_bev=lidar_bev,
            fused_bev=fused,
            decoded_bev=decoded,
            logits=logits,
            depth=lifted.depth if lifted is not None else None,
            camera_context=lifted.context if lifted is not None else None,
            residual_bev=residual,
            objects=objects,
            motion=motion,
            occupancy=occupancy,
            plan=plan,
        )


def build_model(config: ExperimentConfig | ModelConfig) -> BEVModel:
    model_config = config.model if isinstance(config, ExperimentConfig) else config
    return BEVModel(model_config)
