"""The training loop behind ``bridgeta train``: one function, :func:`train`.

What a run does, in order: join the process group torchrun describes (or run alone), seed, build
the model, the training set and its loader, AdamW and the warm-up + cosine schedule; resume from
``out_dir/checkpoints/latest`` when asked; then per optimiser step run ``grad_accumulation``
micro-batches (forward under autocast, focal loss, backward), check the loss, unscale, clip,
step; log, checkpoint, evaluate on schedule; finally write ``model.safetensors``.

**Distillation** (a config with a ``distill`` section, ``bridgeta distill``): the teacher is read
from ``distill.teacher`` and frozen, the registered distiller wraps it with the student, and the
trainer optimises the distiller's learnable parameters (student plus training-only modules such
as BridgeTA's assistant) on the sum of its named loss terms. Batches carry every modality the
teacher and the student read. Checkpoints and the final file are ``distiller`` model files
(student + assistant, never the teacher); the distiller's diagnostics (per level eps*, the two
path losses, ||R^S - R^T||) are averaged over each log window like the loss terms. Evaluation
runs on the student alone.

Design points:

* **Data order** comes from a :class:`~torch.utils.data.DistributedSampler` in every run (with
  one replica when alone), seeded by ``train.seed`` and the epoch. Process ``r`` of ``N`` takes
  every ``N``-th sample of the permutation, so ``N`` processes with batch ``b`` see per step the
  samples one process sees with batch ``b`` and ``N``-fold accumulation. Augmentation is keyed by
  ``(seed, epoch, sample)`` in the dataset, never by worker or process RNG; the epoch lives in
  shared memory, so the persistent loader workers see each one the loop sets (data/epoch.py).
* **Exact resume**: checkpoints are taken at optimiser-step boundaries and record the epoch and
  the micro-batches of it already consumed; the sampler then starts the epoch's permutation past
  them. Model, optimiser, schedule, GradScaler and every RNG (python, numpy, torch CPU/CUDA, per
  rank) are restored, and the DataLoader draws its worker seeds from its own generator so that
  creating an epoch's iterator does not advance the global torch RNG.
* **Non-finite loss**: the reduced loss terms are checked before every optimiser step, so the
  update is never applied and no checkpoint ever holds NaN weights; the run raises
  ``FloatingPointError`` naming the term and the step.
* **Distributed**: DDP wraps the model for the training forward only; saving and evaluation use
  the bare model. BatchNorm stays per process, as in BEVFusion (``SyncBatchNorm`` has no CPU
  kernel): N processes x batch b normalise like one process with N-fold accumulation of batch
  b, not like one process with batch N x b. Gradient accumulation skips the all-reduce
  (``no_sync``) on all but the last micro-batch of a step.
* **No weight decay on biases and normalisation parameters** (every parameter with fewer than two
  dimensions): decaying a BatchNorm scale/shift or a bias pulls a layer's output gain and offset
  towards zero, which constrains what the network computes instead of regularising it (the
  usual split, as timm's and mmcv's ``norm_decay_mult=0`` / ``bias_decay_mult=0``). Weights
  keep ``train.optimizer.weight_decay``.
"""

from __future__ import annotations

import filecmp
import itertools
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bridgeta.config import ConfigError, ExperimentConfig, matches_stored, to_dict, validate
from bridgeta.data.dataset import BEVMapDataset, collate_bev
from bridgeta.precision import autocast_dtype, use_channels_last
from bridgeta.engine.checkpoint import (
    CHECKPOINT_DIR,
    KEEP_CHECKPOINTS,
    checkpoint_bytes,
    config_hash,
    gather_rng_states,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from bridgeta.engine.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    wrap_model,
)
from bridgeta.engine.logging import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, progress_bar
from bridgeta.files import atomic_write_text, check_outputs, remove_paths, require_free_space
from bridgeta.engine.model_file import (
    MODEL_KIND,
    STUDENT_PREFIX,
    build_from_state,
    read_model_file,
    save_model_file,
)
from bridgeta.engine.schedule import WarmupCosineSchedule
from bridgeta.losses import map_segmentation_loss
from bridgeta.models.targets import build_task_targets, task_losses
from bridgeta.distill import Distiller, build_distiller, init_from_previous_stage
from bridgeta.distill.output_cache import OUTPUT_CACHE_ENV, FrozenOutputCache
from bridgeta.models.bev_model import BEVModel, build_model
from bridgeta.models.types import BEVInputs

log = logging.getLogger(__name__)

EvaluateFn = Callable[[BEVModel, ExperimentConfig, str], dict[str, Any]]

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
# Everything a run writes into its directory: a new run refuses a directory holding any of them.
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, CHECKPOINT_DIR, MODEL_FILE)


# ----------------------------------------------------------------------------------------------
# Building blocks


def data_position(steps: int, batches_per_epoch: int, accumulation: int) -> tuple[int, int]:
    """(epoch, micro-batches consumed in it) after ``steps`` optimiser steps from the start: each
    step takes ``accumulation`` micro-batches, the last step of an epoch what is left of it."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    epoch, within = divmod(steps, steps_per_epoch)
    return epoch, within * accumulation


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weights decay; biases and norm parameters (``ndim <= 1``) do not."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]


def _read_input_model(
    source: str, key: str
) -> tuple[BEVModel, ExperimentConfig, dict[str, torch.Tensor], str]:
    """A frozen input of the run (teacher, assistant, previous stage), read once from a model file
    or a run / checkpoint directory: its deployable network, the config it was trained with, the
    file's whole state and its kind (a staged recipe also reads the training-only tensors beside
    the network). A missing or bad file is reported under its config key ``key``."""
    from bridgeta.engine.evaluate import resolve_model_file  # evaluate imports this module's deps

    try:
        path = resolve_model_file(source)
        config, state, kind = read_model_file(path)
        return build_from_state(config, state, kind, path), config, state, kind
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{key}: {exc}") from None


def load_teacher(config: ExperimentConfig) -> BEVModel:
    """The frozen teacher ``distill.teacher`` names: a model file, or a run / checkpoint directory."""
    assert config.distill is not None
    if not config.distill.teacher:
        raise ValueError(
            "distill.teacher is not set: pass --teacher with the teacher's run directory or model file"
        )
    return _read_input_model(config.distill.teacher, "distill.teacher")[0]


def load_assistant(config: ExperimentConfig) -> BEVModel | None:
    """MonoTAKD's trained teaching assistant (``distill.monotakd.assistant``), or None when the
    method reads none. A TA that imitated another teacher is refused (:func:`check_assistant_teacher`)."""
    settings = config.distill.monotakd if config.distill is not None else None
    if config.distill is None or config.distill.method != "monotakd" or settings is None or not settings.assistant:
        return None
    model, assistant_config, _, _ = _read_input_model(settings.assistant, "distill.monotakd.assistant")
    check_assistant_teacher(assistant_config, config.distill.teacher, settings.assistant)
    return model


def check_assistant_teacher(assistant_config: ExperimentConfig, teacher: str | None, assistant: str) -> None:
    """MonoTAKD's CMRD subtracts the TA's BEV from the teacher's, so a TA trained to imitate one
    teacher (``train-assistant --teacher``) is meaningless next to another: refuse the pair when the
    two teachers' model files differ in content. A TA trained without imitation fits any teacher;
    a recorded teacher that no longer exists (moved runs) cannot be checked and is only logged."""
    from bridgeta.engine.evaluate import resolve_model_file

    distill = assistant_config.distill
    if distill is None or not distill.teacher or not teacher:
        return
    try:
        imitated = resolve_model_file(distill.teacher)
    except FileNotFoundError:
        log.warning("distill.monotakd.assistant %s imitated the teacher %s, which no longer exists: "
                    "cannot check that it is distill.teacher %s", assistant, distill.teacher, teacher)
        return
    current = resolve_model_file(teacher)  # load_teacher has already reported a missing one
    if imitated.resolve() != current.resolve() and not filecmp.cmp(imitated, current, shallow=False):
        raise ValueError(
            f"distill.monotakd.assistant {assistant} was trained to imitate the teacher {distill.teacher}, "
            f"not distill.teacher {teacher}: train the assistant against this teacher "
            "(bridgeta train-assistant --teacher ...)"
        )


def load_previous_stage(config: ExperimentConfig) -> tuple[BEVModel, dict[str, torch.Tensor]] | None:
    """The previous stage a staged recipe continues (``distill.tinybev.init_from``): its student,
    and the training-only tensors its file holds beside it (TinyBEV's adapters; empty for a plain
    model file). None without one."""
    settings = config.distill.tinybev if config.distill is not None else None
    if settings is None or config.distill.method != "tinybev" or not settings.init_from:
        return None
    student, _, state, kind = _read_input_model(settings.init_from, "distill.tinybev.init_from")
    extra = {} if kind == MODEL_KIND else {k: v for k, v in state.items() if not k.startswith(STUDENT_PREFIX)}
    return student, extra


def _check_eval_split(dataset: BEVMapDataset, split: str) -> None:
    """``train.eval_split`` must name a split with samples: found now, not after all of training."""
    counts = dataset.cache.meta["counts"]
    if not counts.get(split):
        raise ValueError(
            f"train.eval_split: split '{split}' has no samples in {dataset.cache.cache_dir / 'meta.json'} "
            f"(splits: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
        )


class TrainSampler(DistributedSampler):
    """A shuffling :class:`DistributedSampler` whose epoch can start part-way through.

    ``start`` (samples of this process's share) is skipped without loading them, which is how a
    resumed run continues inside an epoch with the permutation the interrupted run was using.
    """

    def __init__(self, dataset: BEVMapDataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def _seed_worker(worker_id: int) -> None:
    """Seed python and numpy in a loader worker from its torch seed (base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loader_seed(seed: int, rank: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


@contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms for the duration of a run, then the previous settings.

    On CUDA a few ops (scatter-adds) have no deterministic kernel; there torch only warns about
    them (``warn_only``) instead of stopping the run. CPU runs are strict.
    """
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]


# ----------------------------------------------------------------------------------------------
# The run


class _Trainer:
    """State of one training run; :func:`train` is the public entry point."""

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir: Path,
        ctx: DistributedContext,
        evaluate_fn: EvaluateFn | None,
        output_cache: Path | None = None,
    ) -> None:
        if config.data is None:
            raise ValueError("the config has no 'data' section: set data.dataroot (or --dataroot)")
        self.config, self.out_dir, self.ctx, self.evaluate_fn = config, out_dir, ctx, evaluate_fn
        cfg = config.train  # ranges were checked by config validation (bridgeta.config.validate)
        # Per-rank streams; DDP copies rank 0's initial weights to every rank anyway.
        _seed_everything(cfg.seed + ctx.rank)
        # ``model`` is what is evaluated and deployed; ``module`` is what is optimised and saved:
        # the model itself, or a distiller holding it with a frozen teacher.
        self.model = build_model(config).to(ctx.device).train()
        self.distiller: Distiller | None = None
        modalities = self.model.training_modalities
        if config.distill is not None:
            previous = load_previous_stage(config)
            if previous is not None:  # a later stage starts from the previous stage's student
                init_from_previous_stage(self.model, previous[0])
            teacher = load_teacher(config)
            assistant = load_assistant(config)
            try:
                self.distiller = build_distiller(config, self.model, teacher, assistant).to(ctx.device).train()
            except ValueError as exc:  # teacher and student do not fit together
                raise ValueError(f"distill.teacher {config.distill.teacher}: {exc}") from None
            if previous is not None:  # and keeps what it learned beside the student (adapters)
                carried = self.distiller.continue_previous_stage(previous[1])
                if ctx.is_main:
                    log.info("distill.tinybev.init_from: student and %s carried over from %s",
                             ", ".join(carried) or "no training-only module", config.distill.tinybev.init_from)
            modalities = tuple(dict.fromkeys(modalities + self.distiller.input_modalities))
        self.output_cache = output_cache
        self.output_caches: list[FrozenOutputCache] = []  # what use_output_cache set up, for the summary
        self.module: nn.Module = self.distiller if self.distiller is not None else self.model
        if use_channels_last(cfg.memory_format, cfg.precision, ctx.device):
            # Parameters only: inputs are converted by the first convolution that reads them, and
            # model files and checkpoints store contiguous copies, so they do not depend on it.
            self.module.to(memory_format=torch.channels_last)
        if output_cache is not None and self.distiller is not None:
            # Now that the frozen models have their final device and memory format (both name
            # their cached outputs).
            self.output_caches = self.distiller.use_output_cache(output_cache)
            if ctx.is_main:
                log.info("frozen outputs cached under %s (%d model(s))", output_cache, len(self.output_caches))
        self.forward_model = wrap_model(self.module, ctx)

        self.dataset = BEVMapDataset.for_model(
            config.data, self.model, "train", train=True, seed=cfg.seed, modalities=modalities
        )
        if len(self.dataset) == 0:
            raise ValueError(f"split 'train' of {config.data.dataroot} has no samples")
        self.sampler = TrainSampler(self.dataset, ctx.world_size, ctx.rank, cfg.seed)
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=collate_bev,
            num_workers=cfg.num_workers,
            worker_init_fn=_seed_worker,
            generator=self.loader_generator,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=ctx.device.type == "cuda",
        )
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accumulation)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        if self.total_steps < 1:
            raise ValueError("nothing to train: train.epochs and train.max_steps give 0 steps")

        settings = cfg.optimizer
        # The fused kernel updates every tensor in one pass: on CPU it halves the optimiser step
        # against the per-tensor loop PyTorch picks by default there (measured on tiny-c). It
        # walks parameters and moments in memory order, so resumed moments take their parameter's
        # layout (checkpoint._match_parameter_layouts).
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.module, settings.weight_decay), lr=settings.lr, betas=settings.betas,
            fused=ctx.device.type in ("cpu", "cuda"),
        )
        self.scheduler = WarmupCosineSchedule(
            self.optimizer, settings.warmup_steps, self.total_steps, settings.min_lr_ratio
        )
        self.autocast = autocast_dtype(cfg.precision, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")

        # Position: optimiser steps done; epoch in progress and its micro-batches consumed.
        self.step = 0
        self.epoch, self.batch = data_position(cfg.data_start_step, self.batches_per_epoch, cfg.grad_accumulation)
        # ``train.epochs`` worth of steps from where the data stream starts (``train.data_start_step``):
        # a start inside an epoch finishes that epoch first, and ``total_steps`` ends the run.
        self.last_epoch = self.epoch + cfg.epochs + (1 if self.batch else 0)
        self.resumed_from: int | None = None
        self.last_saved_step = -1
        self.last_eval: dict[str, Any] | None = None
        self.last_eval_step = -1
        self.last_loss = math.nan
        self.step_times: list[float] = []
        self.term_names: list[str] = []
        self.term_groups: list[str] = []
        self.logger: MetricsLogger | None = None
        self._window = _Window()

    # -- resume ---------------------------------------------------------------------------------

    def _same_stored_config(self) -> bool:
        """Whether the run's own config.yaml, read by this version, is this config: then a hash
        that differs only reflects how an earlier version wrote the same config (new optional
        sections, renamed keys), not a change."""
        stored = self.out_dir / "config.yaml"
        if not stored.is_file():
            return False
        try:
            return matches_stored(stored, self.config)
        except (ConfigError, yaml.YAMLError):
            return False

    def _resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(
            checkpoint, self.module, self.optimizer, self.scheduler, self.scaler,
            rank=self.ctx.rank, device=self.ctx.device,
        )
        if state.config_hash != config_hash(self.config) and self.ctx.is_main and not self._same_stored_config():
            log.warning("resuming %s with a config that differs from the one it was saved with", checkpoint)
        cfg = self.config.train
        data = state.data
        self.step, self.epoch, self.batch = state.step, state.epoch, data["batch"]
        if (data["world_size"], data["batch_size"]) != (self.ctx.world_size, cfg.batch_size):
            # Another process count or batch size splits the permutation differently: continue
            # after the same number of samples, which is close but not exact.
            samples = data["batch"] * data["batch_size"] * data["world_size"]
            self.batch = min(samples // (cfg.batch_size * self.ctx.world_size), self.batches_per_epoch)
            if self.ctx.is_main:
                log.warning(
                    "resuming with %d process(es) x batch %d instead of %d x %d: the data order is "
                    "not exactly the interrupted run's", self.ctx.world_size, cfg.batch_size,
                    data["world_size"], data["batch_size"],
                )
        self.resumed_from = state.step
        self.last_saved_step = state.step

    # -- steps ----------------------------------------------------------------------------------

    def _micro_step(self, inputs: BEVInputs, labels: torch.Tensor, group_size: int, sync: bool,
                    metas: list[dict] | None = None) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its detached loss terms."""
        inputs = inputs.to(self.ctx.device)
        labels = labels.to(self.ctx.device, non_blocking=True)
        no_sync = self.forward_model.no_sync if self.ctx.distributed and not sync else nullcontext
        # The other heads' targets (objects, motion, planning) for a multi-task model, else None.
        targets = build_task_targets(self.model, metas or [], self.ctx.device)
        with no_sync():
            with torch.autocast(self.ctx.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                if self.distiller is not None:
                    result = self.forward_model(inputs, labels, targets)
                    terms = dict(result.losses)
                    self._window.add_diagnostics(result.logs, 1.0 / group_size)
                    outputs = result.student
                else:
                    outputs = self.forward_model(inputs)
                    weight = self.model.config.heads.map.weight
                    terms = {name: weight * value for name, value in
                             map_segmentation_loss(outputs.logits, labels, self.model.classes).items()}
                terms.update(task_losses(self.model, outputs, targets))
                terms.update(self.model.depth_losses(outputs, inputs))
            if not self.term_names:
                self.term_names = list(terms)
                self.term_groups = [loss_group(name, self.model.classes) for name in self.term_names]
            values = torch.stack([terms[name].float() for name in self.term_names])
            # Each micro-batch weighs 1/group_size, so the update is the mean over the group.
            self.scaler.scale(values.sum() / group_size).backward()
        return values.detach() / group_size

    def _check_finite(self, values: torch.Tensor) -> None:
        if torch.isfinite(values).all():
            return
        bad = ", ".join(
            f"{name}={value}" for name, value in zip(self.term_names, values.tolist()) if not math.isfinite(value)
        )
        checkpoint = latest_checkpoint(self.out_dir)
        message = (
            f"non-finite loss at step {self.step + 1} (epoch {self.epoch}): {bad}; the update was not "
            f"applied. Last good checkpoint: {checkpoint if checkpoint is not None else 'none'}"
        )
        if self.ctx.is_main:
            log.error(message)
        raise FloatingPointError(message)

    def _optimizer_step(self) -> tuple[float, torch.Tensor | None]:
        """Unscale, clip, step, advance the schedule; returns (lr used, grad norm before clipping)."""
        clip = self.config.train.optimizer.grad_clip
        grad_norm = None
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr, grad_norm

    def _train_epoch(self, bar: tqdm) -> bool:
        """Run epoch ``self.epoch`` from micro-batch ``self.batch``; True when it ran to its end."""
        cfg = self.config.train
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.batch * cfg.batch_size
        self.dataset.set_epoch(self.epoch)
        self.loader_generator.manual_seed(_loader_seed(cfg.seed, self.ctx.rank, self.epoch))
        batches = iter(self.loader)
        while self.batch < self.batches_per_epoch and self.step < self.total_steps:
            started = time.perf_counter()
            group_size = min(cfg.grad_accumulation, self.batches_per_epoch - self.batch)
            values = None
            samples = 0
            for micro in range(group_size):
                inputs, labels, metas = next(batches)
                samples += labels.shape[0]
                terms = self._micro_step(inputs, labels, group_size, sync=micro == group_size - 1, metas=metas)
                values = terms if values is None else values + terms
            values = all_reduce_mean(values, self.ctx).cpu()
            self._check_finite(values)
            lr, grad_norm = self._optimizer_step()
            self.batch += group_size
            seconds = time.perf_counter() - started
            self.step_times.append(seconds)
            self.last_loss = float(values.sum())
            self._window.add(values, grad_norm, samples * self.ctx.world_size, seconds)
            bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log(lr)
            if self.evaluate_fn is not None and cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0:
                self._evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save()
        return self.batch == self.batches_per_epoch

    # -- outputs --------------------------------------------------------------------------------

    def _log(self, lr: float) -> None:
        row = self._window.summary(self.term_names, self.term_groups)
        self._window = _Window()
        self.logger.log(self.step, {"epoch": self.epoch, "lr": lr, **row})
        if self.ctx.is_main:
            log.info(
                "step %d/%d epoch %d: loss %.4f, lr %.3g, %.1f samples/s",
                self.step, self.total_steps, self.epoch, row["loss"], lr, row["samples_per_s"],
            )

    def _save(self) -> None:
        """Checkpoint the current step; a finished epoch is stored as the start of the next."""
        epoch, batch = self.epoch, self.batch
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        rng = gather_rng_states(self.ctx)  # a collective: every rank takes part
        if self.ctx.is_main:
            save_checkpoint(
                self.out_dir, self.step, epoch, self.module, self.config, self.optimizer,
                self.scheduler, self.scaler, rng,
                {
                    "batch": batch,
                    "batches_per_epoch": self.batches_per_epoch,
                    "batch_size": self.config.train.batch_size,
                    "world_size": self.ctx.world_size,
                },
            )
        self.last_saved_step = self.step

    def _evaluate(self) -> None:
        """Call ``evaluate_fn`` on every rank (it may shard and all-reduce); rank 0 logs it."""
        split = self.config.train.eval_split
        results = self.evaluate_fn(self.model, self.config, split)
        self.module.train()
        self.last_eval, self.last_eval_step = results, self.step
        # After the loop has moved past a finished epoch (batch 0), label it with that epoch.
        epoch = self.epoch - 1 if self.batch == 0 and self.epoch > 0 else self.epoch
        self.logger.log(self.step, {"epoch": epoch, "eval": {"split": split, **results}})
        if self.ctx.is_main:
            log.info("step %d: %s mIoU %.4f", self.step, split, float(results["miou"]))

    # -- driver ---------------------------------------------------------------------------------

    def _preflight(self) -> None:
        """What would otherwise fail hours in: the eval split, every sensor file, the disk."""
        cfg = self.config.train
        if self.evaluate_fn is not None:
            _check_eval_split(self.dataset, cfg.eval_split)
        missing = self.dataset.missing_files()
        if missing:
            token, path = missing[0]
            more = f", and {len(missing) - 1} more files of split '{self.dataset.split}'" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"{path} (sample {token}) is missing{more}: check the dataroot with bridgeta data check "
                f"--dataroot {self.config.data.dataroot} --version {self.config.data.version}"
            )
        if self.ctx.is_main:
            one = checkpoint_bytes(self.module, self.optimizer)
            require_free_space(self.out_dir, 2 * one, "one checkpoint and the final model file")
            retained = (KEEP_CHECKPOINTS + 1) * one
            try:
                require_free_space(self.out_dir, retained, f"keeping {KEEP_CHECKPOINTS} checkpoints")
            except OSError as exc:
                log.warning("%s; older checkpoints are pruned as the run goes", exc)

    def _check_first_batch(self) -> None:
        """Decode the samples of the first batch to run, so a corrupt file stops the run now."""
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.batch * self.config.train.batch_size
        self.dataset.set_epoch(self.epoch)
        for index in itertools.islice(iter(self.sampler), self.config.train.batch_size):
            self.dataset[index]

    def run(self, resume: bool, force: bool = False) -> dict[str, Any]:
        started = time.perf_counter()
        if resume and force:
            raise ValueError("--resume continues a run and --force replaces it: pass one of them")
        checkpoint, replaced = None, []
        if resume:
            checkpoint = latest_checkpoint(self.out_dir)
            if checkpoint is None:
                raise FileNotFoundError(
                    f"--resume: {self.out_dir} holds no checkpoint to resume ({CHECKPOINT_DIR}/latest): "
                    "drop --resume to start a new run there"
                )
        else:
            hint = "resume it with --resume" if (self.out_dir / CHECKPOINT_DIR).is_dir() else ""
            replaced = check_outputs(self.out_dir, RUN_OUTPUTS, force, hint)
        self._preflight()
        # Everything is read and checked before the first file is written, so a failed resume
        # leaves the run as it was. Restoring the RNG states must follow everything that draws
        # from them (model init); the first-batch check reads files but draws from no global RNG.
        if checkpoint is not None:
            self._resume(checkpoint)
        self._check_first_batch()
        barrier(self.ctx)  # every rank has checked the outputs before rank 0 changes them
        if self.ctx.is_main:
            remove_paths(replaced)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / CONFIG_FILE, yaml.safe_dump(to_dict(self.config), sort_keys=False))
            if self.resumed_from is not None:
                log.info("resumed from %s (step %d)", checkpoint, self.step)
        self.logger = MetricsLogger(self.out_dir, self.ctx.is_main, resume_step=self.step)
        cfg = self.config.train
        with logging_redirect_tqdm(), progress_bar(self.total_steps, self.step, self.ctx.is_main) as bar:
            while self.epoch < self.last_epoch and self.step < self.total_steps:
                if not self._train_epoch(bar):
                    break  # max_steps reached inside the epoch
                epoch_eval = cfg.eval_every > 0 and (self.epoch + 1) % cfg.eval_every == 0
                if self.evaluate_fn is not None and epoch_eval and self.last_eval_step != self.step:
                    self._evaluate()
                if cfg.checkpoint_every == 0:
                    self._save()
                self.epoch, self.batch = self.epoch + 1, 0
        if self.evaluate_fn is not None and self.last_eval_step != self.step:
            self._evaluate()
        if self.last_saved_step != self.step:
            self._save()
        if self.ctx.is_main:
            save_model_file(self.out_dir / MODEL_FILE, self.module, self.config)
        return {
            "method": self.distiller.method if self.distiller is not None else None,
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "final_loss": self.last_loss,
            "seconds": time.perf_counter() - started,
            "step_time_s": statistics.median(self.step_times) if self.step_times else None,
            "eval": self.last_eval,
            "resumed_from": self.resumed_from,
            "out_dir": str(self.out_dir),
            "output_cache": self._output_cache_counts(),
        }

    def _output_cache_counts(self) -> dict[str, Any] | None:
        """Samples whose frozen outputs this process read from the cache (hits) or computed."""
        caches = self.output_caches
        if not caches:
            return None
        return {"root": str(self.output_cache), "hits": sum(c.hits for c in caches),
                "misses": sum(c.misses for c in caches)}

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        # The DDP wrapper's reducer holds the process group and its pending work: release it now,
        # before the group is destroyed, rather than whenever the garbage collector reaches it.
        self.forward_model = self.module


def loss_group(name: str, classes: tuple[str, ...]) -> str:
    """The group a loss term's share is logged under: ``seg/<class>`` -> ``seg``, ``kd/fld`` as is."""
    prefix, _, last = name.rpartition("/")
    return prefix if prefix and last in classes else name


class _Window:
    """Sums over the optimiser steps since the last log line, averaged when it is written."""

    def __init__(self) -> None:
        self.steps = 0
        self.terms: torch.Tensor | None = None
        self.grad_norm = 0.0
        self.grad_norms = 0
        self.samples = 0
        self.seconds = 0.0
        self.diagnostics: dict[str, float] = {}
        self.diagnostic_weight = 0.0

    def add_diagnostics(self, values: dict[str, float], weight: float) -> None:
        """A micro-batch's distiller diagnostics, weighted like its loss (1 / micro-batches)."""
        for key, value in values.items():
            self.diagnostics[key] = self.diagnostics.get(key, 0.0) + weight * value
        self.diagnostic_weight += weight

    def add(self, terms: torch.Tensor, grad_norm: torch.Tensor | None, samples: int, seconds: float) -> None:
        self.steps += 1
        self.terms = terms.clone() if self.terms is None else self.terms + terms
        if grad_norm is not None:
            self.grad_norm += float(grad_norm)
            self.grad_norms += 1
        self.samples += samples
        self.seconds += seconds

    def summary(self, names: list[str], groups: list[str]) -> dict[str, float]:
        terms = (self.terms / self.steps).tolist()
        total = sum(terms)
        row = {"loss": total, **dict(zip(names, terms))}
        # Each loss group's share of the total, so that no term is silently negligible.
        for group, value in zip(groups, terms):
            key = f"share/{group}"
            row[key] = row.get(key, 0.0) + (value / total if total else 0.0)
        if self.grad_norms:
            row["grad_norm"] = self.grad_norm / self.grad_norms
        row["samples_per_s"] = self.samples / self.seconds if self.seconds else 0.0
        row["step_time_s"] = self.seconds / self.steps
        if self.diagnostic_weight:
            row.update({key: value / self.diagnostic_weight for key, value in self.diagnostics.items()})
        return row


def train(
    config: ExperimentConfig,
    out_dir: Path,
    resume: bool = False,
    evaluate_fn: EvaluateFn | None = None,
    force: bool = False,
    output_cache: str | Path | Literal[False] | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; returns a summary of the run.

    ``resume``: continue from ``out_dir/checkpoints/latest`` exactly where it stopped; a directory
    without a checkpoint is an error. Without it, an ``out_dir`` holding anything a run writes
    (``RUN_OUTPUTS``) is refused unless ``force``, which deletes those first. Before anything is
    written the eval split, every sensor file of the split, the first batch, the checkpoint (on
    resume) and the free disk space are checked, so a failed start leaves the directory as it was.

    ``evaluate_fn(model, config, split) -> {"miou": ..., ...}`` runs every ``train.eval_every``
    epochs, every ``train.eval_every_steps`` optimiser steps and at the end (once per step), on every process with the bare (unwrapped) model; the trainer puts the
    model back in training mode afterwards.

    With a ``distill`` section the student ``config.model`` is distilled from
    ``distill.teacher`` (see the module docstring); ``model.safetensors`` is then a ``distiller``
    file (``bridgeta export`` extracts the student).

    Loader workers come from ``train.num_workers`` (``data.num_workers`` is not used here).
    Writes ``config.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and ``model.safetensors``
    (rank 0 only).
    ``output_cache``: a directory where a distillation run keeps its frozen teacher's (and
    MonoTAKD's TA's) outputs per sample and reads them back instead of running them again
    (:mod:`bridgeta.distill.output_cache`: exact, and useful where each sample's augmentation is
    drawn once); default (None): the ``BRIDGETA_OUTPUT_CACHE`` environment variable, else none;
    False: none, whatever the environment says. It is
    not part of the config: with it the frozen models run one sample at a time, which changes
    the weights a run trains by float rounding at most, whatever the cache holds (a run resumed
    with another setting than it started with mixes both). The run's summary counts its hits.

    Raises ``FloatingPointError`` when a loss term is NaN or infinite.
    """
    validate(config, "the run's config")  # also for configs built in code, not only loaded ones
    if output_cache is False:
        output_cache = None
    elif output_cache is None:
        output_cache = os.environ.get(OUTPUT_CACHE_ENV) or None
    if evaluate_fn is not None and config.model.heads.object is not None:
        # Its validation scores detections with the devkit: fail now, not at the first evaluation.
        from bridgeta.data.devkit import DETECTION_PURPOSE, require_devkit

        require_devkit(DETECTION_PURPOSE)
    out_dir = Path(out_dir)
    ctx = init_distributed()
    finished = False
    try:
        with deterministic_mode(config.train.deterministic, ctx.device):
            trainer = _Trainer(config, out_dir, ctx, evaluate_fn, Path(output_cache) if output_cache else None)
            try:
                summary = trainer.run(resume, force)
            finally:
                trainer.close()
        finished = True
        return summary
    finally:
        cleanup(ctx, finished)
