"""Tests of fedtl.client.admin through the `fedtl site` commands: what an operator sees for bad data."""

import numpy as np
from PIL import Image
from site_files import save_png, write_csv
from sklearn.datasets import load_digits

from fedtl.cli.main import build_parser, main


def _digit(i: int) -> np.ndarray:
    return np.round(load_digits().images[i] * (255.0 / 16.0)).astype(np.uint8)


def _init(policy, data, *extra) -> int:
    return main(["site", "init", str(policy), "--name", "s-1", "--data", str(data), "--backbone", "tiny", *extra])


def test_site_init_refuses_an_empty_data_folder_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    policy = tmp_path / "site" / "policy.toml"
    assert _init(policy, tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert f"fedtl: error: image folder {tmp_path / 'data'} is empty" in err and "fix: copy the site's images" in err
    assert not policy.exists() and not policy.parent.exists()


def test_site_init_refuses_one_class_unless_the_classes_are_declared(tmp_path, capsys):
    for i in range(3):
        save_png(tmp_path / "data" / "benign" / f"{i}.png", _digit(i))
    policy = tmp_path / "policy.toml"
    assert _init(policy, tmp_path / "data") == 2
    assert "only the class 'benign'; a classifier needs at least 2 classes" in capsys.readouterr().err
    assert not policy.exists()
    assert _init(policy, tmp_path / "data", "--label-names", "malignant,benign") == 0
    assert 'label-names = ["malignant", "benign"]' in policy.read_text()


def test_site_init_points_out_a_relative_path_resolved_against_the_policy_folder(tmp_path, capsys, monkeypatch):
    for label in ("a", "b"):
        save_png(tmp_path / "data" / label / "0.png", _digit(0))
    monkeypatch.chdir(tmp_path)
    assert _init(tmp_path / "site" / "policy.toml", "data") == 2
    err = capsys.readouterr().err
    assert "resolves the relative path 'data' against its own folder" in err
    assert f"fix: pass --data {tmp_path / 'data'}" in err


def test_site_check_refuses_clashing_labels_with_their_lines(tmp_path, capsys):
    rows = [
        [str(save_png(tmp_path / f"{i}.png", _digit(i))), label] for i, label in enumerate(["benign", "Benign"] * 3)
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)
    policy = tmp_path / "policy.toml"
    assert _init(policy, manifest) == 2  # caught at init already, without decoding
    assert "'Benign' and 'benign' differ only by case ('Benign' at line 3, line 5, line 7; 'benign' at line 2" in (
        capsys.readouterr().err
    )
    assert _init(policy, manifest, "--label-names", "benign,malignant") == 2
    assert "'Benign' (line 3, line 5, line 7, differs only in case from 'benign')" in capsys.readouterr().err


def test_site_check_reports_the_bit_depth_and_where_the_classes_came_from(tmp_path, capsys):
    for c in (0, 1):
        for i in range(4):
            path = tmp_path / "data" / f"class-{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(_digit(4 * c + i) * (4095 / 255)).astype(np.uint16)).save(path)
    policy = tmp_path / "policy.toml"
    assert _init(policy, tmp_path / "data") == 0
    capsys.readouterr()
    assert main(["site", "check", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "pixels: 12-bit values in 16-bit PNG (from the data's largest value): 8" in out
    assert "classes (2, derived from the class-folder names (no label-names declared" in out
    policy.write_text(policy.read_text().replace("label-names = []", 'label-names = ["class-1", "class-0"]'))
    assert main(["site", "check", "--policy", str(policy)]) == 0  # a declared order need not be alphabetical
    out = capsys.readouterr().out
    assert "classes (2, declared (label-names)):" in out
    assert out.index("  class-1 ") < out.index("  class-0 ")


def test_simulate_data_help_names_every_accepted_source():
    simulate = build_parser()._subparsers._group_actions[0].choices["simulate"]
    text = next(a.help for a in simulate._actions if "--data" in a.option_strings)
    assert all(word in text for word in ("digits", ".npz", "image folder", "CSV manifest"))
