"""Data preparation: the nuScenes-format writer, map expansion and the synthetic world."""
