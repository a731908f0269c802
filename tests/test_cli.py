"""The `fedtl` command line: options map onto the run config, bad input exits 2 with the culprit named."""

import os
import re
import subprocess
import sys
from pathlib import Path

from fedtl.cli.lab import config_from_args
from fedtl.cli.main import build_parser, main


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


def test_certs_writes_the_ca_server_certificate_and_site_keys(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "certs"), "--host", "fl.example.org", "--sites", "a,b"]) == 0
    names = sorted(p.name for p in (tmp_path / "certs").iterdir())
    assert names == sorted(
        ["ca.crt", "ca.key", "server.pem", "server.key"] + [f"supernode-{s}.{e}" for s in "ab" for e in ("key", "pub")]
    )
    assert "flwr supernode register" in capsys.readouterr().out
    assert main(["certs", "--out", str(tmp_path / "certs")]) == 2  # never overwritten silently
    assert "refusing to overwrite" in capsys.readouterr().err


def test_server_and_site_start_build_tls_command_lines(tmp_path, capsys):
    from fedtl.cli.server import superlink_command
    from fedtl.cli.site import supernode_command

    args = build_parser().parse_args(["server", "start", "--certs", str(tmp_path)])
    assert main(["server", "start", "--certs", str(tmp_path)]) == 2
    assert "lacks ca.crt, server.pem, server.key; write them with `fedtl certs" in capsys.readouterr().err
    main(["certs", "--out", str(tmp_path)])
    capsys.readouterr()
    assert main(["certs", "--out", str(tmp_path)]) == 2  # the CA stays: sites trust it
    assert "ca.crt, " in (err := capsys.readouterr().err) and "pass --force (overwrite=True in Python)" in err
    command = superlink_command(args)
    # Flower's own scripts of this environment: `.venv/bin/fedtl` runs without .venv/bin on PATH.
    assert command[0] == str(Path(sys.executable).parent / "flower-superlink")
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert command[command.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt")
    policy = tmp_path / "site.toml"
    assert main(["site", "init", str(policy), "--name", "s", "--data", "digits", "--backbone", "tiny"]) == 0
    site = ["site", "start", "--policy", str(policy), "--superlink", "fl.example.org:8000"]
    assert main(site) == 2
    assert "needs --root-certificates CA.pem (TLS), or --insecure" in capsys.readouterr().err
    assert main([*site, "--root-certificates", str(tmp_path / "nope.crt")]) == 2
    assert re.search(r"--root-certificates .*nope\.crt: no such file; fix: ", capsys.readouterr().err)
    assert main([*site, "--root-certificates", str(tmp_path / "ca.crt"), "--auth-key", "gone.key"]) == 2
    assert re.search(r"--auth-key .*gone\.key: no such file; fix: ", capsys.readouterr().err)
    node = supernode_command(
        build_parser().parse_args([*site, "--root-certificates", str(tmp_path / "ca.crt")]), str(policy)
    )
    assert node[0] == str(Path(sys.executable).parent / "flower-supernode")
    assert node[node.index("--node-config") + 1] == f"policy='{policy}'"
    assert "--root-certificates" in node and "--insecure" not in node
    # Unencrypted only to a SuperLink on this machine.
    assert main([*site, "--insecure"]) == 2
    assert "--insecure sends the site's updates unencrypted, so it is only allowed to a SuperLink on this" in (
        capsys.readouterr().err
    )
    loopback = ["site", "start", "--policy", str(policy), "--superlink", "127.0.0.1:8000", "--insecure"]
    assert "--insecure" in supernode_command(build_parser().parse_args(loopback), str(policy))


def test_site_init_check_status_and_ledger(tmp_path, capsys):
    from PIL import Image

    for label in ("cat", "dog"):
        for i in range(4):
            (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / "data" / label / f"{i}.png")
    (tmp_path / "data" / "dog" / "broken.png").write_bytes(b"not a png")
    policy = tmp_path / "site" / "policy.toml"
    init = ["site", "init", str(policy), "--name", "vet-1", "--data", str(tmp_path / "data"), "--backbone", "tiny"]
    assert main(init) == 0
    assert main(["site", "check", "--policy", str(policy)]) == 2
    assert "broken.png" in capsys.readouterr().err
    policy.write_text(policy.read_text().replace('bad-files = "error"', 'bad-files = "skip"'))
    assert main(["site", "check", "--policy", str(policy)]) == 0
    assert "broken.png" in capsys.readouterr().out
    assert main(["site", "status", "--policy", str(policy)]) == 0
    assert "spent epsilon 0.000 of 24 at delta 1e-05; left 24.000" in capsys.readouterr().out
    assert main(["site", "ledger", "--policy", str(policy)]) == 0
    assert "no charges yet" in capsys.readouterr().out


def test_the_table_says_how_many_of_the_sites_trained_when_rounds_sample_them(tmp_path, capsys):
    argv = ["simulate", "--executor", "inprocess", "--backbone", "tiny", "--sites", "4", "--rounds", "1"]
    argv += ["--set", "fraction-train=0.5", "--set", "federated-evaluation=false", "--out", str(tmp_path)]
    assert main(argv) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run "))
    assert ": 2 of 4 sites trained, 1 rounds, backbone tiny" in header


def test_the_command_runs_the_exit_handlers_and_says_everything_before_it_ends(tmp_path):
    # `fedtl` ends its process itself once its exit handlers have run (Python's own teardown of torch's and Flower's
    # modules took a second more): what they and the command wrote must still come out, through pipes too.
    child = (
        "import atexit, sys\n"
        "from fedtl.cli.main import entry\n"
        "atexit.register(lambda: print('an exit handler ran'))\n"
        f"sys.argv = ['fedtl', 'predict', {str(tmp_path / 'missing.safetensors')!r}, 'x.png']\n"
        "entry()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's output waits in a buffer
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "missing.safetensors" in done.stderr
    assert done.stdout.splitlines() == ["an exit handler ran"]
