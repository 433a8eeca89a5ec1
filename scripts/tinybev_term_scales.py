"""S2/S3 term scales on the real pair, before those stages train: the recorded TinyBEV teacher and
the recorded baseline student (a stand-in for S1's), 8 training batches of 2, eval mode, no step.
Prints each distillation term beside the student's own task terms, and the teacher's confident
detections per sample. Run from the repository root, with the cpu-tinybev benchmark's runs in
runs/mt (its teacher and baseline seed 0): .venv/bin/python scripts/tinybev_term_scales.py [s2|s3]"""
import sys
import torch
from bridgeta.config import load_config
from bridgeta.engine.model_file import load_model_file
from bridgeta.engine.evaluate import data_config_for
from bridgeta.data.dataset import BEVMapDataset, collate_bev
from bridgeta.distill import build_distiller
from bridgeta.models.targets import build_task_targets, task_losses

torch.set_num_threads(2)
stage = sys.argv[1] if len(sys.argv) > 1 else "s2"
teacher, teacher_config = load_model_file("runs/mt/runs/tiny-lc-tinybev-seed0/model.safetensors")
student = load_model_file("runs/mt/runs/tiny-c-tinybev-seed0/model.safetensors")[0]
config = load_config(f"distill/tiny-c-tinybev-{stage}", ["data.dataroot=runs/mt/world"])
distiller = build_distiller(config, student, teacher)
distiller.eval()
data = data_config_for(teacher_config, "runs/mt/world", None)
ds = BEVMapDataset.for_model(data, teacher, "train", seed=0)
rows = []
for start in range(0, 16, 2):
    inputs, labels, metas = collate_bev([ds[i * 37 % len(ds)] for i in range(start, start + 2)])[:3]
    targets = build_task_targets(student, metas, "cpu")
    with torch.no_grad():
        out = distiller(inputs, labels, targets)
        task = task_losses(student, out.student, targets)
    row = {k: float(v) for k, v in out.losses.items()}
    row.update({k: float(v) for k, v in task.items()})
    row.update(out.logs)
    rows.append(row)
keys = sorted({k for r in rows for k in r})
for k in keys:
    values = [r.get(k, float("nan")) for r in rows]
    print(f"{k:<34}" + " ".join(f"{v:8.3f}" for v in values))
