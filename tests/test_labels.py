"""Tests of fedtl.shared.labels: class names declared or derived once, and labels that clash refused."""

import pytest

from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.labels import check_known_labels, check_label_names, derive_label_names, find_label_clashes


def _kinds(names):
    return {(clash.labels, clash.kind) for clash in find_label_clashes(names)}


@pytest.mark.parametrize(
    "names, expected",
    [
        (["Malignant", "malignant", "MALIGNANT", "benign"], {(("MALIGNANT", "Malignant", "malignant"), "case")}),
        (["1", "1.0", "01", "2"], {(("01", "1", "1.0"), "type"), (("01", "1", "2", "1.0"), "type")}),
        (["0", "1.0"], {(("0", "1.0"), "type")}),
        (["0", "1", "malignant"], {(("0", "1", "malignant"), "type")}),
        (["benign", "begnin", "malignant"], {(("begnin", "benign"), "spelling")}),
        (["tumor", "tumour"], {(("tumor", "tumour"), "spelling")}),
        (["non-tumour", "non_tumour", "non tumour"], {(("non tumour", "non-tumour", "non_tumour"), "spelling")}),
    ],
)
def test_clashes_by_case_type_and_spelling(names, expected):
    assert _kinds(names) == expected


@pytest.mark.parametrize(
    "names",
    [
        ["benign", "malignant"],
        ["typical", "atypical"],  # a prefix is a different class
        ["normal", "abnormal"],
        ["class_a", "class_b"],  # substitutions never count
        ["grade1", "grade2", "grade10"],  # nor digits
        ["0", "1", "2", "10"],
        ["cat", "act"],  # too short to judge
        ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"],
    ],
)
def test_legitimate_class_sets_do_not_clash(names):
    assert find_label_clashes(names) == []


def test_the_issue_example_is_refused_with_the_offending_lines():
    carriers = {
        "0": ["line 2", "line 6"],
        "1.0": ["line 3"],
        "MALIGNANT": ["line 4"],
        "malignant": ["line 5", "line 7", "line 8", "line 9"],
    }
    with pytest.raises(DataError) as caught:
        derive_label_names(carriers, source="m.csv")
    message = str(caught.value)
    assert message.startswith("m.csv: labels that would train as separate classes but look like one:")
    assert "'MALIGNANT' and 'malignant' differ only by case" in message
    assert "'0' and '1.0' are numbers written both as integers and as decimals" in message
    assert "'0', '1.0', 'MALIGNANT' and 'malignant' mix numeric codes with class names" in message
    assert "('0' at line 2, line 6; '1.0' at line 3; 'MALIGNANT' at line 4; 'malignant' at line 5, line 7, line 8" in (
        message
    )
    assert "and 1 more)" in message
    assert "fix: write each class one way" in message and "declare them with label-names" in message


def test_derived_classes_are_sorted_and_need_two():
    assert derive_label_names({"b": ["x"], "a": ["y"]}, source="s") == ("a", "b")
    with pytest.raises(DataError, match=r"s: only the class 'benign'; a classifier needs at least 2 classes .*fix:"):
        derive_label_names({"benign": ["line 2"]}, source="s")


def test_declared_names_accept_any_order_and_refuse_case_or_number_duplicates():
    assert check_label_names(["malignant", "benign"], source="`label-names`") == ("malignant", "benign")
    assert check_label_names(["benign", "begnin"], source="x") == ("benign", "begnin")  # declared: kept
    with pytest.raises(
        ConfigError, match=r"`label-names`: class names 'Malignant' and 'malignant' differ only by case"
    ):
        check_label_names(["Malignant", "malignant"], source="`label-names`")
    with pytest.raises(ConfigError, match=r"'1' and '1.0' are the same number written differently"):
        check_label_names(["1", "1.0", "2"], source="x")
    with pytest.raises(DataError, match=r"x: 1 class name\(s\) \['a'\]; a classifier needs at least 2"):
        check_label_names(["a"], source="x", error=DataError)


def test_unknown_labels_name_their_places_and_near_matches():
    carriers = {"benign": ["line 2"], "Malignant": ["line 3"], "1.0": ["line 4"], "begnin": ["line 5"], "cyst": ["l6"]}
    with pytest.raises(DataError) as caught:
        check_known_labels(carriers, ("benign", "malignant", "1"), source="m.csv")
    message = str(caught.value)
    assert "m.csv: 4 label(s) not in the federation's label_names:" in message
    assert "'Malignant' (line 3, differs only in case from 'malignant')" in message
    assert "'1.0' (line 4, is the same number as '1')" in message
    assert "'begnin' (line 5, looks like a misspelling of 'benign')" in message
    assert "'cyst' (l6)" in message
    check_known_labels({"benign": ["line 2"]}, ("malignant", "benign"), source="m.csv")  # known: no error
