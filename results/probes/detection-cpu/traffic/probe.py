# Probe of the tiny-traffic world for issue 14: world, backbone, then the camera baseline before
# the teacher (bench accuracy trains the teacher first), as the exact runs bench accuracy reuses.
import sys
from dataclasses import replace
from pathlib import Path
from bridgeta.bench.accuracy import PRESETS, ensure_backbone, ensure_world
from bridgeta.bench.distill import train_method
preset = PRESETS["cpu-mt"]
work, ledger = Path("runs/mt"), Path("results/ledger/mt")
root = ensure_world(work, preset, ledger=ledger)
print("world ready", flush=True)
if "world" in sys.argv[1:]:
    sys.exit()
protocol = replace(preset.protocol, pretrained=str(ensure_backbone(work, root, preset, ledger)))
for method in sys.argv[1:] or ["baseline", "teacher"]:
    print(train_method(method, root, work / "runs", 0, protocol, None, ("val", "test"), ledger=ledger), flush=True)
