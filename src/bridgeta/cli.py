"""The ``bridgeta`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from bridgeta.config import ConfigError


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name or YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted path, YAML value); repeatable",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``train`` and ``distill`` share: the config, the run directory, data, resume."""
    _add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--dataroot", default=None, help="sets data.dataroot")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--force", action="store_true", help="replace what a previous run left in --out")


def _command_info(args: argparse.Namespace) -> int:
    from bridgeta.config import load_config
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.cost import format_cost, measure_model_cost

    config = load_config(args.config, args.overrides)
    model = build_model(config)
    cost = measure_model_cost(model)
    if args.json:
        print(json.dumps({"name": config.name, **cost.as_dict()}, indent=2))
    else:
        print(format_cost(config.name, cost))
    return 0


def _command_presets(args: argparse.Namespace) -> int:
    from bridgeta.config import list_distill_presets, list_presets, load_config

    def table(names: list[str]) -> None:
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:<{width}}  {load_config(name).description}")

    table(list_presets())
    print("\ndistillation recipes (bridgeta distill --config NAME --teacher RUN):")
    table(list_distill_presets())
    return 0


# ``bridgeta bench NAME ARGS...`` -> ``bridgeta.bench.<module>.main(ARGS)``; each benchmark parses
# its own arguments and is imported only when run.
BENCHMARKS = {
    "accuracy": "accuracy",
    "baselines": "baselines",
    "bev-pool": "bev_pool",
    "cost": "cost",
    "data": "data",
    "distill-sweep": "distill_sweep",
    "loader": "loader",
    "precision": "precision",
    "train-cost": "train_cost",
}


def _command_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"bridgeta.bench.{BENCHMARKS[args.bench_command]}")
    return module.main(args.bench_args)


def _command_report(args: argparse.Namespace) -> int:
    from bridgeta.provenance import write_json
    from bridgeta.report import measure_model_zoo, render_docs

    results_dir, docs_dir = Path(args.results), Path(args.docs)
    if args.report_command == "model-zoo":
        path = results_dir / "model_zoo.json"
        write_json(path, measure_model_zoo())
        print(f"wrote {path}")
    for section in render_docs(results_dir, docs_dir):
        print(f"rendered {section}")
    return 0


def _training_config(args: argparse.Namespace):
    from bridgeta.config import load_config

    overrides = list(args.overrides)
    if args.dataroot:
        overrides.insert(0, f"data.dataroot={args.dataroot}")
    config = load_config(args.config, overrides)
    if config.data is None:
        raise ValueError(f"config '{args.config}' says nothing about data: pass --dataroot DIR")
    return config


def _command_train(args: argparse.Namespace) -> int:
    from bridgeta.engine.evaluate import evaluate_checkpoint_model
    from bridgeta.engine.trainer import train

    summary = train(
        _training_config(args), Path(args.out), resume=args.resume, evaluate_fn=evaluate_checkpoint_model,
        force=args.force,
    )
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun, not one per process
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _command_distill(args: argparse.Namespace) -> int:
    from bridgeta.config import MonoTAKDConfig
    from bridgeta.engine.evaluate import evaluate_checkpoint_model
    from bridgeta.engine.trainer import train

    config = _training_config(args)
    # Checked before --teacher is applied: as an override, distill.teacher would create a
    # default distill section on a plain preset and the run would silently distil with it.
    if config.distill is None:
        raise ValueError(
            f"config '{args.config}' has no 'distill' section: use a distillation recipe "
            "(bridgeta presets lists them, e.g. distill/tiny-c-bridgeta) or add one"
        )
    if args.teacher:
        config = replace(config, distill=replace(config.distill, teacher=args.teacher))
    if args.assistant:
        if config.distill.method != "monotakd":
            raise ValueError(f"--assistant is MonoTAKD's trained teaching assistant; config '{args.config}' "
                             f"distils with {config.distill.method}")
        settings = config.distill.monotakd or MonoTAKDConfig()
        config = replace(config, distill=replace(config.distill, monotakd=replace(settings, assistant=args.assistant)))
    summary = train(config, Path(args.out), resume=args.resume, evaluate_fn=evaluate_checkpoint_model, force=args.force,
                    output_cache=args.output_cache)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _command_train_assistant(args: argparse.Namespace) -> int:
    from bridgeta.distill.monotakd import assistant_config
    from bridgeta.engine.evaluate import evaluate_checkpoint_model
    from bridgeta.engine.trainer import train

    # Checked here, before any data is read: the TA's imitation term needs the teacher.
    config = assistant_config(_training_config(args), args.teacher)
    summary = train(config, Path(args.out), resume=args.resume, evaluate_fn=evaluate_checkpoint_model, force=args.force)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _command_pretrain_backbone(args: argparse.Namespace) -> int:
    from bridgeta.engine.pretrain import pretrain_backbone

    overrides = list(args.overrides)
    # The flags are overrides like any other, so the config section and --set stay one source.
    if args.epochs is not None:
        overrides.append(f"pretrain.epochs={args.epochs}")
    if args.max_steps is not None:
        overrides.append(f"pretrain.max_steps={args.max_steps}")
    args.overrides = overrides
    summary = pretrain_backbone(_training_config(args), Path(args.out), force=args.force)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _command_export(args: argparse.Namespace) -> int:
    from bridgeta.engine.evaluate import resolve_model_file
    from bridgeta.files import check_outputs

    out = Path(args.out)
    if out.is_dir():  # checked first: replacing a folder by a file is never what was meant
        suffix = "onnx" if args.format == "onnx" else "safetensors"
        raise IsADirectoryError(f"--out {out} is a directory: give the output file, e.g. {out / ('student.' + suffix)}")
    check_outputs(out.parent, [out.name], args.force)
    if args.format != "onnx" and args.batch_size is not None:
        raise ValueError("--batch-size is for --format onnx (a model file has no fixed batch size)")
    source = resolve_model_file(args.checkpoint)
    if args.format == "onnx":
        from bridgeta.engine.deploy import ONNX_OPSET, export_onnx

        batch_size = 1 if args.batch_size is None else args.batch_size
        exported = export_onnx(source, out, batch_size=batch_size)
        path, model = exported.path, exported.model
        detail = (f", ONNX opset {ONNX_OPSET}, batch {batch_size}; onnxruntime vs PyTorch "
                  f"max |logit difference| {exported.parity_max_abs:.2e}")
    else:
        from bridgeta.engine.model_file import export_student

        path, model = export_student(source, out)
        detail = ""
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: the student of {source} alone, {count / 1e6:.2f} M parameters{detail}")
    return 0


def _command_plot_gap(args: argparse.Namespace) -> int:
    from bridgeta.engine.gap_plot import plot_gap

    path = plot_gap(args.runs, args.out, args.labels)
    print(f"wrote {path}")
    return 0


def _command_eval(args: argparse.Namespace) -> int:
    from bridgeta.engine.evaluate import evaluate_checkpoint

    if args.batch_size < 1 or args.workers < 0:
        flag = "--batch-size must be >= 1" if args.batch_size < 1 else "--workers must be >= 0"
        raise ValueError(f"{flag}, got {args.batch_size if args.batch_size < 1 else args.workers}")
    result = evaluate_checkpoint(
        args.checkpoint, dataroot=args.dataroot, version=args.version, split=args.split,
        batch_size=args.batch_size, num_workers=args.workers,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"split {result['split']}: mIoU {result['miou']:.4f} (iou@max), {result['miou_at_0.5']:.4f} at 0.5")
        for name, value in result["iou"].items():
            print(f"  {name:<14} {value:.4f}")
        for group in ("by_condition", "by_range"):
            parts = [f"{k} {v['miou']:.4f}" if v["miou"] is not None else f"{k} -" for k, v in result[group].items()]
            print(f"{group}: " + ", ".join(parts))
        detection = result.get("detection")
        if detection is not None:
            print(f"objects: mAP {detection['mAP']:.4f}, NDS {detection['NDS']:.4f} over {', '.join(detection['classes'])} "
                  f"(unclipped mAP {detection['mAP_unclipped']:.4f}, from every top-K peak)")
            for name, row in detection["per_class"].items():
                print(f"  {name:<14} AP {row['AP']:.4f} (unclipped {row['AP_unclipped']:.4f})")
            parts = [f"{k} {v['mAP']:.4f}/{v['NDS']:.4f}" if v else f"{k} -" for k, v in detection["by_condition"].items()]
            print("objects by_condition (mAP/NDS): " + ", ".join(parts))
    return 0


def _command_eval_detections(args: argparse.Namespace) -> int:
    from bridgeta.detection_metrics import evaluate_detections

    result = evaluate_detections(args.dataroot, args.version, args.split, args.results, args.classes)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"split {result['split']} ({result['samples']} samples): mAP {result['mAP']:.4f}, NDS {result['NDS']:.4f} "
          f"(unclipped mAP {result['mAP_unclipped']:.4f}: without the 10 % precision and recall floors)")
    columns = ("AP", "AP_unclipped", "ATE", "ASE", "AOE", "AVE", "AAE")
    print(f"{'class':<12}" + "".join(f"{k.replace('AP_unclipped', 'AP unclip'):>10}" for k in columns))
    for name, row in result["per_class"].items():
        print(f"{name:<12}" + "".join(f"{row[k]:>10.3f}" for k in columns))
    return 0


def _command_predict(args: argparse.Namespace) -> int:
    from bridgeta.engine.evaluate import predict_detections
    from bridgeta.files import check_outputs

    check_outputs(Path(args.out).parent, (Path(args.out).name,), args.force)
    path, boxes = predict_detections(args.checkpoint, args.out, args.split, args.dataroot, args.version)
    print(f"wrote {path} ({boxes} boxes)")
    return 0


def _command_calibrate_detections(args: argparse.Namespace) -> int:
    from bridgeta.engine.calibrate import calibrate_detections
    from bridgeta.files import check_outputs

    check_outputs(Path(args.out).parent, (Path(args.out).name,), args.force)
    report = calibrate_detections(args.checkpoint, args.out, args.split, args.dataroot, args.version)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{'class':<12}{'a':>8}{'b':>8}{'boxes':>8}{'matches':>9}{'ECE raw':>9}{'ECE cal':>9}  (ECE cal: in sample)")
    for name, row in report["classes"].items():
        before, after = row["ece_before"], row["ece_after_in_sample"]
        print(f"{name:<12}{row['a']:>8.3f}{row['b']:>8.3f}{row['detections']:>8}{row['matches']:>9}"
              f"{'–' if before is None else f'{before:.3f}':>9}{'–' if after is None else f'{after:.3f}':>9}"
              + ("" if row["fitted"] else "  (not fitted: only hits or only misses)"))
    print(f"wrote {report['out']} (calibrated on {report['split']})")
    return 0


def _command_viz(args: argparse.Namespace) -> int:
    from bridgeta.data.show import parse_sample
    from bridgeta.engine.viz import render_prediction

    path = render_prediction(args.checkpoint, None, args.dataroot, parse_sample(args.sample), args.out, split=args.split)
    print(f"wrote {path}")
    return 0


def _command_synth(args: argparse.Namespace) -> int:
    from bridgeta.data.synth.generate import generate_dataroot

    report = generate_dataroot(
        args.out, args.scenes, args.seed, args.preset, workers=args.workers, duration=args.duration,
        force=args.force,
    )
    print(
        f"wrote {report.dataroot}: {report.samples} samples, {report.sweeps} LiDAR sweeps, "
        f"{report.annotations} boxes in {len(report.towns)} towns "
        f"({', '.join(f'{k} {len(v)} scenes' for k, v in report.scenes.items())}); "
        f"{report.seconds:.1f} s, {report.samples_per_second:.2f} samples/s"
    )
    return 0


def _command_data(args: argparse.Namespace) -> int:
    from bridgeta.data.commands import COMMANDS

    return COMMANDS[args.data_command](args.data_args)


def _command_demo(args: argparse.Namespace) -> int:
    from bridgeta.demo import run_demo

    given = {"scenes": args.scenes, "duration": args.duration}
    run_demo(
        Path(args.out), seed=args.seed, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
        **{key: value for key, value in given.items() if value is not None},
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridgeta",
        description="Cross-modal knowledge distillation for BEV map segmentation (pure PyTorch).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters and MACs of a model config")
    _add_config_arguments(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=_command_info)

    presets = commands.add_parser("presets", help="list the packaged config presets")
    presets.set_defaults(handler=_command_presets)

    bench = commands.add_parser("bench", help="benchmarks (long measurements, not tests)")
    bench.add_argument("bench_command", choices=list(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    bench.set_defaults(handler=_command_bench)

    train = commands.add_parser("train", help="train a BEV model (one process, or many under torchrun)")
    _add_run_arguments(train)
    train.set_defaults(handler=_command_train)

    distill = commands.add_parser(
        "distill", help="distil a student from a frozen teacher (one process, or many under torchrun)"
    )
    _add_run_arguments(distill)
    distill.add_argument("--teacher", default=None, help="teacher model file or run dir (sets distill.teacher)")
    distill.add_argument("--assistant", default=None,
                         help="MonoTAKD: the trained assistant's run dir (sets distill.monotakd.assistant)")
    distill.add_argument("--output-cache", default=None, metavar="DIR",
                         help="keep the frozen teacher's (and TA's) outputs per sample in DIR and read them back "
                         "instead of running them again: exact, and worth it where each sample's augmentation is "
                         "drawn once (data.augment.draws=once) or off (default: $BRIDGETA_OUTPUT_CACHE, else none)")
    distill.set_defaults(handler=_command_distill)

    assistant = commands.add_parser(
        "train-assistant",
        help="train MonoTAKD's camera teaching assistant for a recipe: its student's camera network "
        "lifting with projected LiDAR depth (docs/methods/monotakd.md)",
    )
    _add_run_arguments(assistant)
    assistant.add_argument("--teacher", default=None,
                           help="the teacher's model file or run dir, whose fused BEV the assistant imitates "
                           "(distill.monotakd.assistant_imitation; required unless that is 0)")
    assistant.set_defaults(handler=_command_train_assistant)

    pretrain = commands.add_parser(
        "pretrain-backbone",
        help="train a config's image backbone on the per-pixel camera labels of the train split "
        "(docs/engine.md); any camera model then starts from OUT/backbone.safetensors",
    )
    _add_config_arguments(pretrain)
    pretrain.add_argument("--dataroot", default=None, help="sets data.dataroot (a prepared dataroot with camera labels)")
    pretrain.add_argument("--out", required=True, help="output directory")
    pretrain.add_argument("--epochs", type=int, default=None, help="sets pretrain.epochs")
    pretrain.add_argument("--max-steps", type=int, default=None, help="sets pretrain.max_steps")
    pretrain.add_argument("--force", action="store_true", help="replace what a previous run left in --out")
    pretrain.set_defaults(handler=_command_pretrain_backbone)

    export = commands.add_parser(
        "export", help="the deployable student alone (no teacher or assistant weights) as a model file"
    )
    export.add_argument("--checkpoint", required=True, help="model.safetensors, a run dir or a checkpoint dir")
    export.add_argument("--out", required=True, help="output .safetensors or .onnx")
    export.add_argument(
        "--format", choices=["safetensors", "onnx"], default="safetensors",
        help="safetensors: a bridgeta model file; onnx: a graph from images and camera geometry to "
        "map logits for onnxruntime and other runtimes (docs/deploy.md; needs the deploy extra)",
    )
    export.add_argument("--batch-size", type=int, default=None, help="onnx: the graph's fixed batch size (1)")
    export.add_argument("--force", action="store_true", help="replace an existing output file")
    export.set_defaults(handler=_command_export)

    plot_gap = commands.add_parser("plot-gap", help="||R^S - R^T|| per level over training, several runs, PNG")
    plot_gap.add_argument("runs", nargs="+", help="distillation run directories")
    plot_gap.add_argument("--out", required=True, help="output PNG")
    plot_gap.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run")
    plot_gap.set_defaults(handler=_command_plot_gap)

    evaluate = commands.add_parser("eval", help="evaluate a model file / run / checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="model.safetensors, a run dir or a checkpoint dir")
    evaluate.add_argument("--dataroot", default=None, help="override the data the model was trained on")
    evaluate.add_argument("--version", default=None)
    evaluate.add_argument("--split", default=None, help="default: test")
    evaluate.add_argument("--batch-size", type=int, default=2)
    evaluate.add_argument("--workers", type=int, default=0)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_command_eval)

    detections = commands.add_parser(
        "eval-detections",
        help="the nuScenes detection metric (mAP, NDS, TP errors; the devkit's algorithm) of a submission JSON",
    )
    detections.add_argument("--dataroot", required=True)
    detections.add_argument("--version", default="v1.0-trainval")
    detections.add_argument("--split", required=True, help="our towns' train/val/test, or a nuScenes split")
    detections.add_argument("--results", required=True, help="nuScenes detection submission JSON")
    detections.add_argument("--classes", nargs="+", default=None,
                            help="classes to average over (default: the world's, or all ten on nuScenes)")
    detections.add_argument("--json", action="store_true", help='print {"mAP", "NDS", "per_class", ...}')
    detections.set_defaults(handler=_command_eval_detections)

    predict = commands.add_parser(
        "predict", help="a model's 3D boxes over a split as a nuScenes detection submission JSON (object head)"
    )
    predict.add_argument("--checkpoint", required=True, help="model.safetensors, a run dir or a checkpoint dir")
    predict.add_argument("--out", required=True, help="submission .json")
    predict.add_argument("--split", default=None, help="default: test")
    predict.add_argument("--dataroot", default=None)
    predict.add_argument("--version", default=None)
    predict.add_argument("--force", action="store_true", help="replace an existing output file")
    predict.set_defaults(handler=_command_predict)

    calibrate = commands.add_parser(
        "calibrate-detections", help="per-class Platt scaling of the object head's scores, fitted on validation")
    calibrate.add_argument("--checkpoint", required=True, help="model.safetensors, a run dir or a checkpoint dir")
    calibrate.add_argument("--out", required=True, help="the calibrated model file (.safetensors)")
    calibrate.add_argument("--split", default="val", help="a split the model did not train on (default: val)")
    calibrate.add_argument("--dataroot", default=None)
    calibrate.add_argument("--version", default=None)
    calibrate.add_argument("--json", action="store_true", help="print the report as JSON")
    calibrate.add_argument("--force", action="store_true", help="replace an existing output file")
    calibrate.set_defaults(handler=_command_calibrate_detections)

    viz = commands.add_parser("viz", help="cameras, prediction vs ground truth per class, error map")
    viz.add_argument("--checkpoint", required=True)
    viz.add_argument("--sample", required=True, help="sample index in the split, or token")
    viz.add_argument("--out", required=True)
    viz.add_argument("--dataroot", default=None)
    viz.add_argument("--split", default=None)
    viz.set_defaults(handler=_command_viz)

    synth = commands.add_parser(
        "synth", help="generate a synthetic world as a nuScenes-format dataroot"
    )
    synth.add_argument("--out", required=True, help="new dataroot directory")
    synth.add_argument("--scenes", type=int, required=True, help="scenes over train/val/test towns")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--preset", default="tiny", help="world size, traffic and sensor resolution: tiny, tiny-traffic (busy streets: the detection presets' world), default")
    synth.add_argument("--workers", type=int, default=None, help="rendering processes (default: cores)")
    synth.add_argument("--duration", type=float, default=None, help="scene length in s (default 20)")
    synth.add_argument("--force", action="store_true", help="replace a world already in --out")
    synth.set_defaults(handler=_command_synth)

    data = commands.add_parser("data", help="nuScenes-format dataroots: check, prepare, labels, show")
    data.add_argument("data_command", choices=["check", "prepare", "labels", "show"])
    data.add_argument("data_args", nargs=argparse.REMAINDER, help="arguments of the data command")
    data.set_defaults(handler=_command_data)

    report = commands.add_parser(
        "report", help="measure results files and render the docs' tables from them"
    )
    report.add_argument(
        "report_command",
        choices=["model-zoo", "render"],
        help="model-zoo: measure every preset, then render; render: only re-render the docs",
    )
    report.add_argument("--results", default="results", help="results directory")
    report.add_argument("--docs", default="docs", help="docs directory")
    report.set_defaults(handler=_command_report)

    demo = commands.add_parser("demo", help="the main job on the embedded default")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    # Defaults None: the demo preset's (bench accuracy --preset demo), written once, in bench/accuracy.py.
    demo.add_argument("--scenes", type=int, default=None, help="scenes of the synthetic world (default: the demo preset's)")
    demo.add_argument("--duration", type=float, default=None, help="seconds per scene (default: the demo preset's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=None, help="epochs of each student (default: the demo preset's)")
    demo.add_argument("--teacher-epochs", type=int, default=None, help="epochs of the teacher (default: the demo preset's)")
    demo.set_defaults(handler=_command_demo)
    return parser


# Errors a user can cause and fix (bad paths, values, files, a full disk): one line and exit 2.
# Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, KeyError, IndexError, ImportError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line.

    An error raised in a DataLoader worker arrives re-raised with the worker's traceback in its
    message; its last line is the original message.
    """
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:
        last = lines[-1]  # "package.module.SomeError: message"
        return re.sub(r"^[A-Za-z_][\w.]*: ", "", last, count=1)
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    debug = args.debug or os.environ.get("BRIDGETA_DEBUG") == "1"
    try:
        return args.handler(args)
    except ConfigError as exc:
        if debug:
            raise
        print(f"bridgeta: config error: {one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a non-finite loss stopped training; the last good checkpoint is kept
        if debug:
            raise
        print(f"bridgeta: {one_line(exc)}", file=sys.stderr)
        return 1
    except EXPECTED_ERRORS as exc:
        if debug:
            raise
        print(f"bridgeta: {one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
