"""The command line: info (params/MACs via torch's flop counter), presets, config errors."""

import json


from bridgeta.cli import main
from bridgeta.config import load_config
from bridgeta.models.bev_model import build_model
from bridgeta.models.cost import measure_model_cost


def test_info_json_reports_params_and_macs(capsys):
    assert main(["info", "--config", "tiny-lc", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = build_model(load_config("tiny-lc"))
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["macs"] > 0
    blocks = report["blocks"]
    assert set(blocks) >= {"camera_encoder.backbone", "lidar_encoder", "fuser", "decoder.backbone", "head"}
    # The blocks partition the model: their parameters and MACs add up to the totals.
    assert sum(b["params"] for b in blocks.values()) == report["params"]
    assert sum(b["macs"] for b in blocks.values()) == report["macs"]


def test_counted_macs_match_a_hand_count_for_the_fuser():
    # conv3x3 over concat(32 camera + 64 lidar) -> 32 channels on the 128x128 feature grid.
    cost = measure_model_cost(build_model(load_config("tiny-lc")))
    fuser = next(b for b in cost.blocks if b.name == "fuser")
    assert fuser.macs == (32 + 64) * 32 * 9 * 128 * 128


def test_info_text_has_per_block_breakdown(capsys):
    assert main(["info", "--config", "tiny-c"]) == 0
    text = capsys.readouterr().out
    assert "camera_encoder.backbone" in text and "decoder.neck" in text and "total" in text


def test_config_error_exit_code_names_key(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny-c\nmodel:\n  decoder:\n    blockz: []\n")
    assert main(["info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.decoder.blockz" in err and "bad.yaml" in err


def test_presets_lists_descriptions(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "bevfusion-c " in out and "tiny-lc" in out
    # Each table's descriptions start in one column, however long its longest name.
    presets, recipes = out.split("\ndistillation recipes")
    for lines in (presets.splitlines(), recipes.splitlines()[1:]):
        starts = {line.index("  ") + len(line[line.index("  "):]) - len(line[line.index("  "):].lstrip())
                  for line in lines if line}
        assert len(starts) == 1, starts
    assert "distill/tiny-c-tinybev-bridgeta  BridgeTA on the TinyBEV student" in recipes


def test_demo_runs_the_demo_presets_world_unless_told_otherwise(monkeypatch, tmp_path):
    """`bridgeta demo`'s world is the demo preset's (one place: bench/accuracy.py), and a given
    --scenes/--duration still reaches it."""
    import inspect

    import bridgeta.demo as demo
    from bridgeta.bench.accuracy import PRESETS

    real = demo.run_demo
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kwargs: calls.append(kwargs))

    def effective(kwargs):
        bound = inspect.signature(real).bind(tmp_path, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    assert main(["demo", "--out", str(tmp_path)]) == 0
    chosen = effective(calls[-1])
    assert (chosen["scenes"], chosen["duration"]) == (PRESETS["demo"].scenes, PRESETS["demo"].duration)
    assert (chosen["epochs"], chosen["teacher_epochs"]) == (None, None)  # None: the preset's protocol
    assert main(["demo", "--out", str(tmp_path), "--scenes", "3", "--duration", "4"]) == 0
    chosen = effective(calls[-1])
    assert (chosen["scenes"], chosen["duration"]) == (3, 4.0)
