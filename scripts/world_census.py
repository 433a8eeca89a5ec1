"""Count a dataroot's annotations by category and attribute, per keyframe, with their distance
from the ego: what a detection table on that world measures.

    python scripts/world_census.py DATAROOT [DATAROOT ...] > census.json

Reads the nuScenes tables of ``DATAROOT/v1.0-trainval`` (no devkit needed). Per world: keyframes,
annotations per keyframe by category, the share of vehicle annotations that are parked, the
counts by (category, attribute), and by category the share within 20 m and 50 m of the ego.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path


def census(dataroot: Path, version: str = "v1.0-trainval") -> dict:
    tables = dataroot / version

    def read(name: str) -> list[dict]:
        return json.loads((tables / f"{name}.json").read_text())

    annotations = read("sample_annotation")
    category_of = {c["token"]: c["name"] for c in read("category")}
    instance_category = {i["token"]: category_of[i["category_token"]] for i in read("instance")}
    attribute_of = {a["token"]: a["name"] for a in read("attribute")}
    ego = {e["token"]: e["translation"] for e in read("ego_pose")}
    sample_ego = {d["sample_token"]: ego[d["ego_pose_token"]] for d in read("sample_data")
                  if d["is_key_frame"] and d.get("fileformat") == "pcd"}
    keyframes = len(read("sample"))
    by_category, by_attribute, distances = Counter(), Counter(), defaultdict(list)
    for annotation in annotations:
        category = instance_category[annotation["instance_token"]]
        by_category[category] += 1
        for token in annotation["attribute_tokens"]:
            by_attribute[f"{category} / {attribute_of[token]}"] += 1
        x, y = sample_ego[annotation["sample_token"]][:2]
        distances[category].append(math.hypot(annotation["translation"][0] - x, annotation["translation"][1] - y))
    vehicles = sum(n for c, n in by_category.items() if c.startswith("vehicle."))
    parked = sum(n for key, n in by_attribute.items() if key.endswith("/ vehicle.parked"))
    return {
        "dataroot": str(dataroot),
        "keyframes": keyframes,
        "per_keyframe": {c: n / keyframes for c, n in sorted(by_category.items())},
        "vehicle_share_parked": parked / vehicles if vehicles else None,
        "by_attribute": dict(sorted(by_attribute.items())),
        "share_within_20m": {c: sum(d < 20 for d in v) / len(v) for c, v in sorted(distances.items())},
        "share_within_50m": {c: sum(d < 50 for d in v) / len(v) for c, v in sorted(distances.items())},
    }


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    missing = [a for a in argv if not (Path(a) / "v1.0-trainval" / "sample_annotation.json").is_file()]
    if missing:
        print(f"{missing[0]}: no v1.0-trainval/sample_annotation.json", file=sys.stderr)
        return 2
    print(json.dumps([census(Path(a)) for a in argv], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
