"""`fedtl sweep`: a tiny real sweep end to end, its baselines, negative transfer, and spec validation."""

import csv

import pytest
from conftest import REPO_ROOT
from PIL import Image

from fedtl.cli.main import main
from fedtl.shared.errors import ConfigError
from fedtl.simulations.sweep import parse_spec

pytestmark = pytest.mark.slow  # a whole sweep with baselines through the CLI

SPEC = """
name = "tiny"
data = "digits"
backbones = ["tiny"]
epsilons = [4.0, 8.0]  # at epsilon 2 a site alone learns too little on `tiny` features to show the harm
sites = [3]
partitions = ["iid"]
seeds = [0, 1]
methods = ["fedavg"]
[config]
num-rounds = 2
local-epochs = 6
learning-rate = 4.0
permuted-label-sites = "0"
"""


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Run the tiny sweep once through the CLI; return its folder and what it printed."""
    home = tmp_path_factory.mktemp("fedtl-home")
    root = tmp_path_factory.mktemp("sweep")
    spec = root / "spec.toml"
    spec.write_text(SPEC)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTL_HOME", str(home))
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["sweep", str(spec), "--out", str(out)])
    return {"out": out, "code": code, "stdout": buffer.getvalue(), "home": home}


def test_sweep_writes_every_table_plot_and_the_report(sweep):
    out = sweep["out"]
    assert sweep["code"] == 0
    results = _rows(out / "results.csv")
    runs = [r for r in results if r["method"] == "fedavg"]
    assert sorted((float(r["target_epsilon"]), int(r["seed"])) for r in runs) == [(4, 0), (4, 1), (8, 0), (8, 1)]
    methods = {r["method"] for r in results}
    assert methods == {"fedavg", "majority", "central", "central-dp", "local", "federated-nonprivate"}
    for r in runs:
        assert 0 < float(r["accuracy"]) <= 1 and 0 < float(r["site_accuracy"]) <= 1
        assert float(r["epsilon_spent"]) <= float(r["target_epsilon"])
    for r in results:
        if r["method"] in ("central-dp", "local"):
            assert float(r["epsilon_spent"]) == pytest.approx(float(r["target_epsilon"]), rel=0.02)
    rounds = _rows(out / "rounds.csv")
    assert {int(r["round"]) for r in rounds} == {0, 1, 2}
    site_rounds = _rows(out / "site_rounds.csv")
    assert {r["site"] for r in site_rounds} == {"site-0", "site-1", "site-2"}
    report = (out / "report.md").read_text()
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000
        with Image.open(png) as image:
            assert min(image.size) > 200
        assert png.name in report


def test_features_are_extracted_once_per_site_partition(sweep):
    # Two seeds give two partitions of 3 sites, each with a train and a test split: 12 feature files,
    # however many runs (4 DP + 2 non-private) and baselines read them.
    home_files = list(sweep["home"].glob("sim-sites/site-*/features/*"))
    assert len(home_files) == 12, home_files


def test_negative_transfer_is_flagged_for_the_site_with_permuted_labels(sweep):
    sites = _rows(sweep["out"] / "sites.csv")
    assert {r["site"] for r in sites} == {"site-0", "site-1", "site-2"}
    permuted = [r for r in sites if r["site"] == "site-0"]
    assert permuted and all(r["negative_transfer"] == "true" for r in permuted)
    for r in permuted:
        gain = float(r["transfer_gain"])
        assert gain == pytest.approx(float(r["federated_accuracy"]) - float(r["local_accuracy"]))
        assert gain < -2 * float(r["gain_stderr"])
    assert "site-0" in sweep["stdout"] and "NEGATIVE TRANSFER" in sweep["stdout"].upper()
    assert "site-0" in (sweep["out"] / "report.md").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epsilon = [1.0]\nepsilons=[1.0]", r"unknown key `epsilon`; did you mean `epsilons`\?"),
        ("[grid]\nepsilons = [1.0]", r"unknown key `grid`\. Known keys: alphas, backbone, "),
        ("epsilons = []", r"`epsilons` must be a non-empty list"),
        ('epsilons = [1.0]\nmethods = ["fedsgd"]', r"unknown method 'fedsgd'"),
        ("epsilons = [1.0]\n[config]\nseed = 3", r"\[config\] sets `seed`, which the sweep grid sets per run"),
        ('epsilons = [1.0]\npartitions = ["zipf:2"]', r"zipf"),
        ("epsilons = [1.0]\n[config]\nnum-round = 3", r"unknown config key `num-round`"),
        ("epsilons = [-1.0]", r"every epsilon must be a finite number > 0"),
    ],
)
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_alphas_expand_to_dirichlet_partitions():
    spec = parse_spec("epsilons = [1.0]\nalphas = [0.1, 1]\nseeds=[0,1]\nsites=[2,4]")
    assert spec.partitions == ("dirichlet:0.1", "dirichlet:1")
    assert spec.num_runs == 2 * 2 * 2 * (1 + 1)  # partitions x seeds x sites x (1 epsilon + non-private)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "simulations" / "specs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(path):
    spec = parse_spec(path.read_text(), source=str(path))
    assert spec.num_runs > 0
