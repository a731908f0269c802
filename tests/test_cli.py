"""The `fedtl` command line: options map onto the run config, bad input exits 2 with the culprit named."""

from fedtl.simulations.cli import build_parser, config_from_args, main


def test_flags_and_set_overrides_map_onto_the_run_config():
    args = build_parser().parse_args(
        [
            "simulate",
            "--rounds",
            "3",
            "--epsilon",
            "2",
            "--partition",
            "dirichlet:0.5",
            "--non-private",
            "--set",
            "local-epochs=2",
            "--set",
            'head="mlp"',
            "--set",
            "accountant=prv",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.num_rounds, cfg.target_epsilon, cfg.partition) == (3, 2.0, "dirichlet:0.5")
    assert (cfg.local_epochs, cfg.head, cfg.accountant, cfg.non_private) == (2, "mlp", "prv", True)


def test_unknown_key_exits_2_naming_it(capsys):
    assert main(["simulate", "--set", "learning-rat=1.0"]) == 2
    assert "unknown config key `learning-rat`; did you mean `learning-rate`?" in capsys.readouterr().err


def test_bad_value_exits_2_before_anything_runs(capsys):
    assert main(["simulate", "--epsilon", "-1"]) == 2
    assert "`target-epsilon` must be > 0.0, got -1.0" in capsys.readouterr().err


def test_missing_model_file_is_named(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.safetensors"), str(tmp_path / "x.png")]) == 2
    assert "nope.safetensors does not exist" in capsys.readouterr().err


def test_zero_sites_is_refused(capsys):
    assert main(["simulate", "--sites", "0"]) == 2
    assert "`sites` must be >= 1" in capsys.readouterr().err


def test_simulate_prints_the_final_table_and_labels_a_non_private_run(tmp_path, capsys):
    import os

    argv = ["simulate", "--backbone", "tiny", "--sites", "2", "--rounds", "1", "--out", str(tmp_path), "--non-private"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NON-PRIVATE BASELINE (no DP)" in out
    assert out.count("inf") >= 3  # both sites and the max
    assert "server" in out and "majority" in out
    assert "FEDTL_SIMULATED_SITES" not in os.environ  # the opt-in does not outlive the simulation
    (run_dir,) = tmp_path.iterdir()
    assert "NON-PRIVATE BASELINE" in (run_dir / "model.md").read_text()
