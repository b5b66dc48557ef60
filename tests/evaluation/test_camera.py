"""``evaluate_camera`` end to end on stand-in pipelines whose camera behaviour is known: one that
draws each scene exactly as the position map asks (every edit recovered, consistent), and one that
ignores the camera (no edit recovered)."""

import json

import pytest
from camera_scenes import SceneCamera
from PIL import Image

from homediff.errors import ConfigError
from homediff.evaluation.camera import EDITS, TOLERANCE, camera_markdown, evaluate_camera
from homediff.evaluation.settings import CameraSettings

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = CameraSettings(seeds=2, steps=1, batch=3)


@pytest.fixture(scope="module")
def faithful(tmp_path_factory):
    out = tmp_path_factory.mktemp("camera")
    pipe = SceneCamera()
    return pipe, evaluate_camera(pipe, ["a red ball", "two cats"], SETTINGS, out=out), out


def test_a_camera_that_follows_the_position_map_is_recovered(faithful):
    _, report, _ = faithful
    assert set(report["edits"]) == {e.name for e in EDITS}
    for name, edit in report["edits"].items():
        assert edit["images"] == 4 and edit["recovered"] in (True, None), name
        for key in ("shift_error", "zoom_error"):
            if key in edit:
                assert edit[key][0] < 0.03 and edit[f"{key}_of_mean"] < 0.03, (name, key)
        assert edit["offset_px"][0] < 0.3, name
        assert edit["similarity"][0] > 0.98 and edit["similarity_requested"][0] > 0.98, name
        assert edit["baseline"][0] < edit["similarity"][0] - 0.2, name
        assert edit["baseline_requested"][0] < edit["similarity_requested"][0] - 0.2, name
    assert report["edits"]["x +0.4"]["x"][0] == pytest.approx(0.4, abs=0.01)
    assert report["edits"]["x +0.4"]["requested_move_px"] == [-0.4 * 16, -0.0]
    assert report["edits"]["zoom 1.5"]["zoom"][0] == pytest.approx(1.5, rel=0.01)
    assert report["edits"]["2:1 frame"]["recovered"] is None


def test_every_view_is_drawn_from_the_same_seeds(faithful):
    pipe, report, _ = faithful
    frames = {(h, w) for _, h, w, _ in pipe.calls}
    assert frames == {(32, 32), (32, 64), (64, 32)}
    # 13 views of 4 images, whole prompts (2 seeds each) in batches of at most 3
    assert [n for n, *_ in pipe.calls] == [2] * 13 * 2
    asked = {(c["zoom"], c["x_shift"], c["y_shift"]) for *_, c in pipe.calls}
    assert asked >= {(e.camera.zoom, e.camera.x, e.camera.y) for e in EDITS}


def test_a_camera_blind_model_recovers_no_move():
    report = evaluate_camera(SceneCamera(blind=True), ["a red ball"], SETTINGS)
    for edit in EDITS[:10]:
        measured = report["edits"][edit.name]
        assert measured["recovered"] is False, edit.name
        error = measured.get("shift_error", measured.get("zoom_error"))
        assert error[0] == pytest.approx(1.0, abs=0.05) and error[0] > TOLERANCE
        of_mean = measured.get("shift_error_of_mean", measured.get("zoom_error_of_mean"))
        assert of_mean == pytest.approx(1.0, abs=0.05)


def test_the_report_is_written(faithful):
    _, report, out = faithful
    saved = json.loads((out / "camera.json").read_text())
    assert saved["edits"]["y -0.2"]["y"] == pytest.approx(report["edits"]["y -0.2"]["y"])
    table = (out / "camera.md").read_text()
    assert table == camera_markdown(report)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(EDITS)
    assert "| x +0.2 | x +0.2 | zoom 1.00, x +0.20, y +0.00 |" in table
    with Image.open(out / "camera.png") as figure:
        assert figure.width > 3 * 96 and figure.height > len(EDITS) * 96


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="seeds must be at least 2"):
        evaluate_camera(SceneCamera(), ["a"], CameraSettings(seeds=1))
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate_camera(SceneCamera(), [], SETTINGS)
