"""Procedural synthetic driving world written out in nuScenes format."""
