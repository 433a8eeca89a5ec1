"""Driving conditions of a scene, read from its nuScenes description.

nuScenes scene descriptions carry the words "night" and "rain" (e.g. "Night, rain, peds"); our
synthetic generator writes them the same way. One rule serves the cache, the checker and the
evaluation breakdown. Whole words only: "train station" is not rain.
"""

from __future__ import annotations

import re

CONDITIONS = ("day", "night", "rain")
_NIGHT = re.compile(r"\bnight\b", re.IGNORECASE)
_RAIN = re.compile(r"\brain(y|ing)?\b", re.IGNORECASE)


def scene_condition(description: str) -> str:
    """``night``, ``rain`` or ``day`` (night wins over rain: darkness dominates the difficulty)."""
    if _NIGHT.search(description):
        return "night"
    if _RAIN.search(description):
        return "rain"
    return "day"
