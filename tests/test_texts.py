"""Text sites: the loader's bad inputs, and all-MiniLM-L6-v2 read offline, fingerprinted and verified at a site."""

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from fedtl.client.site import BackboneStore
from fedtl.shared import encoders
from fedtl.shared.backbones import (
    backbone_state_dict,
    build_backbone,
    fingerprint_backbone,
    get_backbone_spec,
    resolve_preprocessing,
)
from fedtl.shared.errors import DataError, FingerprintMismatchError
from fedtl.shared.features import extract_features, feature_cache_key
from fedtl.shared.loaders import load_site_dataset
from fedtl.shared.texts import read_text_records


def _write(tmp_path, content, name="texts.csv"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _needs_minilm():
    try:
        importlib.metadata.distribution(encoders.MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the PyPI package {encoders.MINILM_PACKAGE} is not installed ({encoders.INSTALL_MINILM})")


def _texts(*values):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# --- the loader ------------------------------------------------------------------------------------


def test_csv_and_jsonl_read_the_same_texts(tmp_path):
    rows = [("My card was charged twice, please refund", "card"), ('He said "no" to my\nmortgage', "mortgage")]
    csv_text = "text,label\n" + "".join('"' + t.replace('"', '""') + f'",{lab}\n' for t, lab in rows)
    jsonl = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)
    a = read_text_records(_write(tmp_path, csv_text))
    b = read_text_records(_write(tmp_path, jsonl, "texts.jsonl"))
    assert a.texts == b.texts == [t for t, _ in rows] and a.labels == b.labels == ["card", "mortgage"]


def test_undecodable_bytes_are_refused_with_line_and_offset(tmp_path):
    path = _write(tmp_path, b"text,label\nfine,a\ncaf\xe9 latte,b\n")
    with pytest.raises(DataError, match=r"byte\(s\) b'\\xe9' at offset 21 \(line 3\) are not UTF-8"):
        read_text_records(path)


def test_empty_texts_are_refused_by_line(tmp_path):
    path = _write(tmp_path, 'text,label\nfine,a\n"   ",b\nok,a\n"",b\n')
    with pytest.raises(DataError, match=r"2 empty or whitespace-only text\(s\) at line 3, line 5"):
        read_text_records(path)


def test_over_long_texts_are_cut_and_counted(tmp_path):
    path = _write(tmp_path, f"text,label\n{'x' * 60},a\nshort,b\n{'y' * 51},a\n")
    records = read_text_records(path, max_chars=50)
    assert [len(t) for t in records.texts] == [50, 5, 50]
    assert records.notes == ("2 text(s) longer than 50 characters were cut to their first 50",)


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        ("body,label\nhi,a\n", "t.csv", r"has no column\(s\) \['text'\]"),
        ("text,label\nhi,\n", "t.csv", r"line 2: the label column 'label' is empty"),
        ('{"text": "hi", "label": "a"}\n{"text": "hi"\n', "t.jsonl", r"line 2 is not JSON"),
        ('["hi", "a"]\n', "t.jsonl", r"line 1 must be a JSON object"),
        ("text,label,split\nhi,a,train\nho,b,later\n", "t.csv", r"line 3: column 'split' must be one of"),
        ("text,label\n", "t.csv", r"holds no texts"),
    ],
)
def test_bad_text_files_are_refused_naming_the_problem(tmp_path, content, name, match):
    with pytest.raises(DataError, match=match):
        read_text_records(_write(tmp_path, content, name))


def test_site_loader_refuses_unknown_labels_and_reports_texts(tmp_path):
    lines = [
        f"complaint number {i} about my {'card' if i % 2 else 'loan'},{'card' if i % 2 else 'loan'}" for i in range(12)
    ]
    path = _write(tmp_path, "text,label\n" + "\n".join(lines) + "\n")
    data = load_site_dataset(path, label_names=["loan", "card"])
    assert data.report.inputs == "texts" and data.splits.train.kind == "texts"
    assert data.splits.train.label_names == ("loan", "card")
    assert "texts: " in data.report.summary()
    with pytest.raises(DataError, match="mortgage"):
        load_site_dataset(path, label_names=["loan", "mortgage"])


def test_text_fingerprint_covers_every_character():
    from fedtl.shared.dataset import ImageDataset

    a = ImageDataset(_texts("ab", "c"), np.array([0, 1]), ("x", "y"), "a")
    b = ImageDataset(_texts("a", "bc"), np.array([0, 1]), ("x", "y"), "b")  # same characters, split elsewhere
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == ImageDataset(_texts("ab", "c"), np.array([0, 1]), ("x", "y"), "z").fingerprint()


# --- the encoder -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    _needs_minilm()
    return build_backbone("minilm_l6")


def test_tokens_match_the_reference_wordpiece_tokenizer(minilm):
    """Oracle: transformers' pure-Python BertTokenizer over the package's vocab.txt (another implementation)."""
    from transformers import BertTokenizer

    vocab = encoders.minilm_file("tokenizer.json", encoders.MINILM_TOKENIZER[1]).parent / "vocab.txt"
    slow = BertTokenizer(str(vocab), do_lower_case=True)
    texts = _texts("I was charged an OVERDRAFT fee of $35!", "Crédit reporting agency ignored my dispute.")
    batch = resolve_preprocessing("minilm_l6").apply(texts)  # (2, 2, L)
    for i, text in enumerate(texts):
        ids = slow(str(text))["input_ids"]
        assert batch[i, 0, : len(ids)].tolist() == ids
        assert batch[i, 1].sum().item() == len(ids)  # the mask covers exactly the text's tokens


def test_embeddings_are_mean_pooled_unit_vectors_independent_of_padding(minilm):
    pre = resolve_preprocessing("minilm_l6")
    short, long = "late fee on my card", "the bank closed my savings account without any notice or reason given"
    together = extract_features(minilm, _texts(short, long), pre, progress=False)  # short is padded here
    alone = extract_features(minilm, _texts(short), pre, progress=False)
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # Oracle for the pooling: the BERT token states of the unpadded text, averaged by hand.
    batch = pre.apply(_texts(short))
    with torch.inference_mode():
        states = minilm.bert(input_ids=batch[:, 0]).last_hidden_state[0]  # (L, 384)
    mean = states.mean(0)
    np.testing.assert_allclose(alone[0], (mean / mean.norm()).numpy(), atol=1e-5)
    assert together.shape == (2, get_backbone_spec("minilm_l6").feature_dim)


def test_encoder_fingerprint_is_checked_at_the_site(minilm, tmp_path):
    state = backbone_state_dict(minilm)
    fingerprint = fingerprint_backbone(minilm)
    store = BackboneStore(tmp_path / "backbones")
    tampered = dict(state)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    tampered[key] = state[key].clone()
    tampered[key][0, 0] += 1e-3
    with pytest.raises(FingerprintMismatchError, match="refusing them"):
        store.install("minilm_l6", fingerprint, tampered)
    store.install("minilm_l6", fingerprint, state)
    assert fingerprint_backbone(store.load("minilm_l6", fingerprint)) == fingerprint
    with open(store.path(fingerprint), "r+b") as fh:  # the stored file changed on disk after it was verified
        fh.seek(-8, 2)
        last = fh.read(1)
        fh.seek(-8, 2)
        fh.write(bytes([last[0] ^ 0x01]))
    with pytest.raises(FingerprintMismatchError, match="modified on disk"):
        store.load("minilm_l6", fingerprint)


def test_package_files_are_pinned_and_the_cache_key_holds_the_tokenizer(minilm, monkeypatch):
    monkeypatch.setattr(encoders, "MINILM_WEIGHTS", ("model.safetensors", "0" * 64))
    with pytest.raises(FingerprintMismatchError, match="fedtl pins 0000000000000000"):
        encoders.minilm_file(*encoders.MINILM_WEIGHTS)
    pre = resolve_preprocessing("minilm_l6")
    other = encoders.TextPreprocessing(pre.tokenizer, pre.tokenizer_sha256, 64)
    assert feature_cache_key("b", "d", pre) != feature_cache_key("b", "d", other)
    assert '"max_length":128' in pre.key() and pre.tokenizer_sha256 in pre.key()


def test_texts_given_to_an_image_backbone_are_refused():
    with pytest.raises(DataError, match=r"holds texts but the run's backbone reads images.*'minilm_l6'"):
        extract_features(build_backbone("tiny"), _texts("hello"), resolve_preprocessing("tiny"), progress=False)
