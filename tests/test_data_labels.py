"""Map labels: the devkit's mask lands in exactly our BEV cells (X forward, Y left, index up)."""

import math

import numpy as np
import pytest
from shapely.geometry import LineString, Point, Polygon, box

from bridgeta.config import MAP_CLASSES
from bridgeta.geometry import BEVGrid

pytest.importorskip("nuscenes")

from bridgeta.data.devkit import load_map  # noqa: E402
from bridgeta.data.labels import rasterise_map_labels  # noqa: E402
from bridgeta.data.map_expansion import write_map_expansion  # noqa: E402
from bridgeta.data.synth.world_types import MapLayers  # noqa: E402

BOUNDS = (0.0, 0.0, 1000.0, 1000.0)
# Asymmetric on purpose: a centring or axis mistake moves cells.
GRID = BEVGrid((-20.0, 30.0, 0.5), (-25.0, 15.0, 0.5))


def pose(x: float, y: float, yaw_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    matrix = np.eye(4)
    matrix[:2, :2] = [[c, -s], [s, c]]
    matrix[:3, 3] = [x, y, 0.3]
    return matrix


def load(tmp_path, layers: MapLayers, location: str = "synth-labels"):
    write_map_expansion(tmp_path, location, layers, BOUNDS)
    return load_map(tmp_path, location)


def cell_centres_global(global_T_ego: np.ndarray, grid: BEVGrid) -> np.ndarray:
    """(X, Y, 2) global x, y of every cell centre, computed without the devkit."""
    xs = grid.x[0] + (np.arange(grid.shape[0]) + 0.5) * grid.x[2]
    ys = grid.y[0] + (np.arange(grid.shape[1]) + 0.5) * grid.y[2]
    ex, ey = np.meshgrid(xs, ys, indexing="ij")
    gx = global_T_ego[0, 0] * ex + global_T_ego[0, 1] * ey + global_T_ego[0, 3]
    gy = global_T_ego[1, 0] * ex + global_T_ego[1, 1] * ey + global_T_ego[1, 3]
    return np.stack([gx, gy], axis=-1)


# Corners on cell centres of GRID for an ego at (500, 500) with yaw 0 or 90 deg.
RECTANGLE = (510.25, 503.25, 517.75, 506.75)


@pytest.mark.parametrize("yaw_deg", [0.0, 90.0])
def test_rectangle_lands_in_exactly_the_expected_cells(tmp_path, yaw_deg):
    nusc_map = load(tmp_path, MapLayers(drivable_area=[box(*RECTANGLE)]))
    global_T_ego = pose(500.0, 500.0, yaw_deg)
    labels = rasterise_map_labels(nusc_map, global_T_ego, GRID)
    assert labels.shape == (6, 100, 80) and labels.dtype == bool

    centres = cell_centres_global(global_T_ego, GRID)
    x0, y0, x1, y1 = RECTANGLE
    eps = 1e-6  # closed rectangle: centres on the boundary count
    expected = (
        (centres[..., 0] >= x0 - eps) & (centres[..., 0] <= x1 + eps)
        & (centres[..., 1] >= y0 - eps) & (centres[..., 1] <= y1 + eps)
    )
    assert expected.sum() == 16 * 8  # 7.5 m x 3.5 m of centres at 0.5 m
    assert np.array_equal(labels[0], expected)
    assert not labels[1:].any()
    # Independent spot check of the axes: yaw 0 -> the rectangle is ahead (X +10..+17.5) and to the
    # left (Y +3..+7); yaw 90 (facing north) -> ahead (X +3..+7) and to the right (Y -10..-17.5).
    cells = np.argwhere(labels[0])
    ahead, left = GRID.x[0] + (cells[:, 0] + 0.5) * 0.5, GRID.y[0] + (cells[:, 1] + 0.5) * 0.5
    if yaw_deg == 0:
        assert ahead.min() == 10.25 and ahead.max() == 17.75 and left.min() == 3.25 and left.max() == 6.75
    else:
        assert ahead.min() == 3.25 and ahead.max() == 6.75 and left.min() == -17.75 and left.max() == -10.25


def test_general_pose_errs_only_at_the_boundary(tmp_path):
    """At an arbitrary pose the devkit rounds vertices to cell centres: only edge cells may differ."""
    polygon = Polygon([(505.0, 497.0), (521.0, 501.0), (515.0, 512.0), (503.0, 506.0)])
    nusc_map = load(tmp_path, MapLayers(walkway=[polygon]))
    global_T_ego = pose(498.3, 501.7, 33.0)
    labels = rasterise_map_labels(nusc_map, global_T_ego, GRID)
    centres = cell_centres_global(global_T_ego, GRID)
    expected = np.array([[polygon.contains(Point(*c)) for c in row] for row in centres])
    assert expected.sum() > 300
    wrong = np.argwhere(labels[MAP_CLASSES.index("walkway")] != expected)
    assert len(wrong) < 0.1 * expected.sum()
    for i, j in wrong:
        assert polygon.exterior.distance(Point(*centres[i, j])) < 0.5  # within one cell of the edge


def test_divider_is_the_union_of_road_and_lane_dividers(tmp_path):
    road = LineString([(490.1, 502.1), (525.1, 502.1)])  # 2.1 m left of the ego, along X
    lane = LineString([(490.1, 496.9), (525.1, 496.9)])  # 3.1 m right
    global_T_ego = pose(500.0, 500.0, 0.0)
    both_map = load(tmp_path / "a", MapLayers(road_divider=[road], lane_divider=[lane]))
    both = rasterise_map_labels(both_map, global_T_ego, GRID)
    only_road = rasterise_map_labels(load(tmp_path / "b", MapLayers(road_divider=[road])), global_T_ego, GRID)
    only_lane = rasterise_map_labels(load(tmp_path / "c", MapLayers(lane_divider=[lane])), global_T_ego, GRID)
    divider = MAP_CLASSES.index("divider")
    assert only_road[divider].any() and only_lane[divider].any()
    assert np.array_equal(both[divider], only_road[divider] | only_lane[divider])
    assert not both[:divider].any()

    # The cells containing the line are set; the devkit's 2 px stroke adds one cell either side.
    column = int((2.1 - GRID.y[0]) // 0.5)  # cell holding Y = +2.1
    rows = slice(int((-9.9 - GRID.x[0]) // 0.5), int((25.1 - GRID.x[0]) // 0.5) + 1)
    assert only_road[divider][rows, column].all()
    set_columns = np.unique(np.argwhere(only_road[divider])[:, 1])
    assert set_columns.tolist() == [column - 1, column, column + 1]


def test_class_order_and_selection(tmp_path):
    layers = MapLayers(
        drivable_area=[box(505.25, 490.25, 509.75, 494.75)],
        ped_crossing=[box(511.25, 490.25, 514.75, 494.75)],
        walkway=[box(505.25, 505.25, 509.75, 509.75)],
        stop_line=[box(511.25, 505.25, 514.75, 509.75)],
        carpark_area=[box(517.25, 505.25, 520.75, 509.75)],
        lane_divider=[LineString([(517.1, 490.1), (520.6, 490.1)])],
    )
    nusc_map = load(tmp_path, layers)
    global_T_ego = pose(500.0, 500.0, 0.0)
    labels = rasterise_map_labels(nusc_map, global_T_ego, GRID)
    probes = {  # an ego point well inside each class's shape
        "drivable_area": (7.5, -7.5), "ped_crossing": (13.0, -7.5), "walkway": (7.5, 7.5),
        "stop_line": (13.0, 7.5), "carpark_area": (19.0, 7.5), "divider": (19.0, -9.9),
    }
    for index, name in enumerate(MAP_CLASSES):
        x, y = probes[name]
        cell = (int((x - GRID.x[0]) // 0.5), int((y - GRID.y[0]) // 0.5))
        assert [labels[k][cell] for k in range(6)] == [k == index for k in range(6)], name
    subset = rasterise_map_labels(nusc_map, global_T_ego, GRID, classes=("divider", "walkway"))
    assert np.array_equal(subset, labels[[5, 2]])
    with pytest.raises(ValueError, match="unknown map class 'road'"):
        rasterise_map_labels(nusc_map, global_T_ego, GRID, classes=("road",))


def reference_labels(shapes, centres: np.ndarray) -> np.ndarray:
    """Plain rasterisation: a cell is set when its centre is inside the closed exterior of a shape
    and outside the closed holes of that same shape (the devkit fills boundaries and clears holes
    with their boundary)."""
    out = np.zeros(centres.shape[:2], dtype=bool)
    for exterior, holes in shapes:
        x0, y0, x1, y1 = exterior
        inside = (centres[..., 0] >= x0 - 1e-6) & (centres[..., 0] <= x1 + 1e-6)
        inside &= (centres[..., 1] >= y0 - 1e-6) & (centres[..., 1] <= y1 + 1e-6)
        for hx0, hy0, hx1, hy1 in holes:
            inside &= ~(
                (centres[..., 0] >= hx0 - 1e-6) & (centres[..., 0] <= hx1 + 1e-6)
                & (centres[..., 1] >= hy0 - 1e-6) & (centres[..., 1] <= hy1 + 1e-6)
            )
        out |= inside
    return out


@pytest.mark.parametrize("yaw_deg", [0.0, 90.0])
def test_overlapping_touching_holed_and_invalid_polygons_match_a_plain_rasterisation(tmp_path, yaw_deg):
    from data_fixture import REAL_MAP_LAYERS, REAL_MAP_SHAPES, SELF_TOUCHING_RING, SELF_TOUCHING_SQUARES

    assert not SELF_TOUCHING_RING.is_valid  # the case the devkit drops
    nusc_map = load(tmp_path, REAL_MAP_LAYERS)
    global_T_ego = pose(500.0, 500.0, yaw_deg)
    labels = rasterise_map_labels(nusc_map, global_T_ego, GRID)  # raised TopologyException before
    centres = cell_centres_global(global_T_ego, GRID)
    expected = {
        "drivable_area": reference_labels(REAL_MAP_SHAPES["drivable_area"], centres),
        "walkway": reference_labels(REAL_MAP_SHAPES["walkway"] + SELF_TOUCHING_SQUARES, centres),
    }
    for name, cells in expected.items():
        got = labels[MAP_CLASSES.index(name)]
        wrong = np.argwhere(got != cells)
        assert cells.sum() > 200 and not len(wrong), (name, len(wrong), wrong[:5].tolist())
    # The island in the courtyard's hole and the square across the hole's border are labelled;
    # the rest of the hole is not.
    drivable = labels[MAP_CLASSES.index("drivable_area")]
    def cell(x, y):
        return tuple(np.argwhere((np.abs(centres[..., 0] - x) < 0.01) & (np.abs(centres[..., 1] - y) < 0.01))[0])
    assert drivable[cell(492.25, 506.25)] and drivable[cell(496.25, 505.25)]
    assert not drivable[cell(489.25, 504.25)]
    walkway = labels[MAP_CLASSES.index("walkway")]
    assert walkway[cell(502.25, 487.25)] and walkway[cell(506.25, 491.25)]  # both halves of the ring


def test_data_labels_command_on_a_real_style_map(tmp_path):
    from data_fixture import REAL_MAP_LAYERS, VERSION, build_dataroot

    from bridgeta.cli import main
    from bridgeta.data.devkit import load_nuscenes

    root = tmp_path / "root"
    build_dataroot(root, scenes=SCENES_ONE, keyframes_per_scene=1, map_layers=REAL_MAP_LAYERS)
    token = load_nuscenes(root, VERSION).sample[0]["token"]
    out = tmp_path / "labels.npy"
    assert main(["data", "labels", "--dataroot", str(root), "--version", VERSION, "--sample", token,
                 "--out", str(out)]) == 0
    labels = np.load(out)
    assert labels.shape == (6, 200, 200) and labels[MAP_CLASSES.index("drivable_area")].sum() > 500


SCENES_ONE = (("scene-a", "Day", 0.0, "train"),)
