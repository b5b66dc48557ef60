import json

from homediff.app.cli import main


def test_presets_lists_exact_sizes(capsys):
    assert main(["model", "presets"]) == 0
    out = capsys.readouterr().out
    assert "343,176,208" in out and "xut-tiny" in out


def test_info_on_an_hdm_arch_json(official_small, capsys):
    assert main(["model", "info", "--hdm-config", str(official_small / "meta.json"),
                 "--height", "32", "--width", "32", "--text-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 2,488,592" in out
    assert "routing 0.5" in out and "routing 0.0" in out


def test_bad_arch_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "arch.json"
    bad.write_text(json.dumps({"dim": 128, "use_dyt": True}))
    assert main(["model", "info", "--hdm-config", str(bad)]) == 2
    assert "use_dyt" in capsys.readouterr().err
