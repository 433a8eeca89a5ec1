"""``bridgeta data {check,prepare,labels,show}``: argument parsing for the data tools."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from bridgeta.files import atomic_path


def _dataroot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataroot", required=True, type=Path, help="nuScenes-format dataroot")
    parser.add_argument("--version", default="v1.0-trainval", help="table folder, e.g. v1.0-mini")


def main_prepare(argv: Sequence[str]) -> int:
    from bridgeta.data.cache import LabelCache
    from bridgeta.data.prepare import prepare_dataroot

    parser = argparse.ArgumentParser(
        prog="bridgeta data prepare",
        description="Rasterise labels and cache per-sample metadata once (needs nuscenes-devkit); "
        "training then reads the cache without the devkit.",
    )
    _dataroot_arguments(parser)
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default DATAROOT/.bridgeta_cache/VERSION)")
    parser.add_argument("--max-sweeps", type=int, default=10, help="previous LiDAR sweeps to index per sample")
    parser.add_argument("--workers", type=int, default=0, help="processes rasterising labels")
    parser.add_argument("--force", "--overwrite", dest="force", action="store_true", help="rebuild an existing cache")
    args = parser.parse_args(argv)
    cache_dir = prepare_dataroot(
        args.dataroot,
        args.version,
        cache_dir=args.cache,
        max_sweeps=args.max_sweeps,
        overwrite=args.force,
        workers=args.workers,
    )
    meta = LabelCache(cache_dir).meta
    print(f"cache: {cache_dir}")
    print(f"samples per split: {json.dumps(meta['counts'])}")
    for split, coverage in meta["coverage"].items():
        print(f"label coverage {split}: " + ", ".join(f"{k} {v:.3f}" for k, v in coverage.items()))
    return 0


def main_labels(argv: Sequence[str]) -> int:
    from bridgeta.data.devkit import load_map, load_nuscenes
    from bridgeta.data.labels import rasterise_map_labels
    from bridgeta.data.prepare import DEFAULT_LABEL_GRID, pose_matrix

    parser = argparse.ArgumentParser(
        prog="bridgeta data labels",
        description="Write one sample's BEV label map: uint8 (6, 200, 200), (C, X, Y), ego frame of the "
        "LIDAR_TOP keyframe, classes in bridgeta's order.",
    )
    _dataroot_arguments(parser)
    parser.add_argument("--sample", required=True, help="sample token")
    parser.add_argument("--out", required=True, type=Path, help="output .npy file")
    args = parser.parse_args(argv)
    nusc = load_nuscenes(args.dataroot, args.version)
    if args.sample not in nusc._token2ind["sample"]:
        raise ValueError(f"sample token '{args.sample}' is not in {args.dataroot}/{args.version}/sample.json")
    sample = nusc.get("sample", args.sample)
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    global_T_ego = pose_matrix(nusc.get("ego_pose", lidar["ego_pose_token"]))
    location = nusc.get("log", nusc.get("scene", sample["scene_token"])["log_token"])["location"]
    labels = rasterise_map_labels(load_map(args.dataroot, location), global_T_ego, DEFAULT_LABEL_GRID)
    with atomic_path(args.out) as temporary, temporary.open("wb") as handle:
        np.save(handle, labels.astype(np.uint8))
    print(f"wrote {args.out}: {labels.shape} (C, X, Y), cells per class {labels.sum(axis=(1, 2)).tolist()}")
    return 0


def main_show(argv: Sequence[str]) -> int:
    from bridgeta.data.cache import LabelCache, default_cache_dir
    from bridgeta.data.prepare import prepare_dataroot
    from bridgeta.data.show import parse_sample, render_sample_picture

    parser = argparse.ArgumentParser(
        prog="bridgeta data show",
        description="One picture of a sample: the six cameras, LiDAR points in BEV and the label map.",
    )
    _dataroot_arguments(parser)
    parser.add_argument("--sample", required=True, help="sample index in the cache, or sample token")
    parser.add_argument("--out", required=True, type=Path, help="output PNG")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (prepared if missing)")
    args = parser.parse_args(argv)
    sample = parse_sample(args.sample)  # before a possibly long prepare
    cache_dir = args.cache or default_cache_dir(args.dataroot, args.version)
    if not (cache_dir / "meta.json").is_file():
        print(f"no cache at {cache_dir}: preparing it first")
        prepare_dataroot(args.dataroot, args.version, cache_dir=cache_dir)
    path = render_sample_picture(LabelCache(cache_dir), sample, args.out)
    print(f"wrote {path}")
    return 0


def main_check(argv: Sequence[str]) -> int:
    from bridgeta.data.check import main

    return main(argv)


COMMANDS = {"check": main_check, "prepare": main_prepare, "labels": main_labels, "show": main_show}
