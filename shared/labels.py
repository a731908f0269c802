"""A federation's class names: declared or derived once, and checked the same way at every site and in the lab.

Labels arrive as text (class-folder names, a manifest's label column). Text that names one class in two
ways would silently become two classes, so derived class sets are refused when two labels differ only by

- case: equal after case-folding (`Malignant`, `MALIGNANT`, `malignant`);
- type: both read as the same number (`1`, `1.0`, `01`), numbers written both as integers and as
  decimals (`0` and `1.0`), or numeric codes beside names (`0` and `malignant`);
- spelling: equal once spaces, `-`, `_` and `.` are dropped (`non-tumour`, `non_tumour`), or, for
  words of at least MIN_SPELLING_LETTERS letters (no digits), the same first letter with the other
  letters rearranged (`begnin`/`benign`), or one letter more after the first (`tumor`/`tumour`).

The spelling rule is conservative on purpose: substitutions (`class_a`/`class_b`), digits
(`grade1`/`grade2`) and prefixes (`typical`/`atypical`, `normal`/`abnormal`) never count, so legitimate
class pairs pass. Declared names (`label-names`) are the user's explicit statement: they are refused
only for case and same-number duplicates, never for spelling, so a pair the rule flags can be kept by
declaring it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fedtl.shared.errors import ConfigError, DataError

__all__ = [
    "MIN_CLASSES",
    "LabelClash",
    "check_known_labels",
    "check_label_names",
    "derive_label_names",
    "find_label_clashes",
]

MIN_CLASSES = 2  # a 1-class "classifier" scores accuracy 1.0 and learns nothing, while still spending epsilon
MIN_SPELLING_LETTERS = 5  # shorter words are too often legitimately close (`cat`/`act`)
SEPARATORS = re.compile(r"[\s\-_.]+")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
INTEGER = re.compile(r"[+-]?\d+")
MAX_LISTED = 3  # places listed per label in a message


@dataclass(frozen=True)
class LabelClash:
    """Labels that look like one class written in different ways: which, and how they differ."""

    labels: tuple[str, ...]
    kind: str  # "case", "type" or "spelling"
    reason: str  # e.g. "differ only by case"


def find_label_clashes(names: Iterable[str]) -> list[LabelClash]:
    """Groups of `names` that differ only by case, type (number spelling) or spelling (see the module docstring)."""
    names = sorted(dict.fromkeys(names))
    clashes: list[LabelClash] = []
    in_case = set()
    for group in _groups(names, str.casefold):
        clashes.append(LabelClash(group, "case", "differ only by case"))
        in_case.update(group)
    numbers = {n: float(n) for n in names if NUMBER.fullmatch(n)}
    for group in _groups(list(numbers), lambda n: numbers[n]):
        clashes.append(LabelClash(group, "type", "are the same number written differently"))
    integers = [n for n in numbers if INTEGER.fullmatch(n)]
    decimals = [n for n in numbers if not INTEGER.fullmatch(n)]
    if integers and decimals:
        clashes.append(
            LabelClash(tuple(integers + decimals), "type", "are numbers written both as integers and as decimals")
        )
    words = [n for n in names if n not in numbers]
    if numbers and words:
        clashes.append(LabelClash(tuple(list(numbers) + words), "type", "mix numeric codes with class names"))
    spelled = [n for n in names if n not in in_case]
    for group in _groups(spelled, _squeezed):
        clashes.append(LabelClash(group, "spelling", "differ only by spaces or punctuation"))
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if _squeezed(a) != _squeezed(b) and _misspelt(_squeezed(a), _squeezed(b)):
                clashes.append(LabelClash((a, b), "spelling", "differ only by a misspelling"))
    return clashes


def check_label_names(names: Sequence[str], *, source: str, error: type[Exception] = ConfigError) -> tuple[str, ...]:
    """Return declared class names as a tuple, or raise `error` naming what is wrong and the fix.

    Declared names must be >= MIN_CLASSES non-empty strings without surrounding spaces, unique, and free of
    case or same-number duplicates; their order is the federation's class order (any order is accepted).
    """
    if (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or not all(isinstance(n, str) and n and n.strip() == n for n in names)
    ):
        raise error(
            f"{source}: class names must be a sequence of non-empty strings without surrounding spaces, got "
            f"{names!r}; fix: pass e.g. ('benign', 'malignant')"
        )
    names = tuple(names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise error(
            f"{source}: class names must be unique, got {list(names)} (duplicates: {duplicates}); "
            "fix: give each class exactly one name"
        )
    if len(names) < MIN_CLASSES:
        raise error(
            f"{source}: {len(names)} class name(s) {list(names)}; a classifier needs at least {MIN_CLASSES} classes "
            "(one class trains to accuracy 1.0 and learns nothing, while charging epsilon); fix: list every class"
        )
    clashes = [c for c in find_label_clashes(names) if c.kind == "case" or c.reason.startswith("are the same")]
    if clashes:
        raise error(
            f"{source}: class names {', '.join(_clash_text(c) for c in clashes)}; they would train as separate "
            "classes; fix: name each class once"
        )
    return names


def derive_label_names(carriers: Mapping[str, Sequence[str]], *, source: str) -> tuple[str, ...]:
    """The classes of data without declared names: its labels sorted, refused when they clash or are too few.

    Args:
        carriers: each label found -> where it occurs ("line 4", "benign/img1.png", "class folder x/").
        source: the data, for messages.

    Raises:
        DataError: fewer than MIN_CLASSES labels, or labels that differ only by case, type or spelling
            (each listed with the places it occurs).
    """
    names = tuple(sorted(carriers))
    if len(names) < MIN_CLASSES:
        found = f"only the class {names[0]!r}" if names else "no class"
        raise DataError(
            f"{source}: {found}; a classifier needs at least {MIN_CLASSES} classes (one class trains to accuracy "
            "1.0 and learns nothing, while charging epsilon); fix: add the other classes' images, or declare the "
            "federation's classes (label-names), which lets a site hold images of one class"
        )
    clashes = find_label_clashes(names)
    if clashes:
        involved = sorted({n for c in clashes for n in c.labels})
        places = "; ".join(f"{n!r} at {_places(carriers[n])}" for n in involved)
        raise DataError(
            f"{source}: labels that would train as separate classes but look like one: "
            f"{'; '.join(_clash_text(c) for c in clashes)} ({places}); fix: write each class one way (rename the "
            "folder or correct the label column), or, if these really are different classes, declare them with "
            "label-names"
        )
    return names


def check_known_labels(carriers: Mapping[str, Sequence[str]], declared: Sequence[str], *, source: str) -> None:
    """Raise DataError naming every label outside the `declared` classes, where it occurs and its near match."""
    unknown = [label for label in carriers if label not in declared]
    if not unknown:
        return
    described = []
    for label in unknown[:5]:
        match = _near_match(label, declared)
        hint = f", {match}" if match else ""
        described.append(f"{label!r} ({_places(carriers[label])}{hint})")
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise DataError(
        f"{source}: {len(unknown)} label(s) not in the federation's label_names: {'; '.join(described)}{more}; "
        f"allowed: {list(declared)}; fix: rename or correct these labels (names are case-sensitive), remove those "
        "images, or have the federation add the class"
    )


def _near_match(label: str, declared: Sequence[str]) -> str:
    """How `label` nearly matches a declared name ('differs only in case from ...'), or ''."""
    for name in declared:
        clash = find_label_clashes([label, name])
        if clash and clash[0].kind == "case":
            return f"differs only in case from {name!r}"
        if any(c.reason.startswith("are the same") for c in clash):
            return f"is the same number as {name!r}"
        if any(c.kind == "spelling" for c in clash):
            return f"looks like a misspelling of {name!r}"
    return ""


def _groups(names: Sequence[str], key) -> list[tuple[str, ...]]:
    """Groups of two or more `names` with equal `key`, each sorted, in order of their first member."""
    grouped: dict[object, list[str]] = {}
    for name in names:
        grouped.setdefault(key(name), []).append(name)
    return [tuple(group) for group in grouped.values() if len(group) > 1]


def _squeezed(name: str) -> str:
    """`name` case-folded without spaces, '-', '_' and '.'."""
    return SEPARATORS.sub("", name.casefold())


def _misspelt(a: str, b: str) -> bool:
    """Whether squeezed words `a`, `b` are a transposition or a one-letter insertion of each other (see module doc)."""
    if not (a.isalpha() and b.isalpha()) or min(len(a), len(b)) < MIN_SPELLING_LETTERS or a[0] != b[0]:
        return False
    if len(a) == len(b):
        return sorted(a) == sorted(b)
    short, long = sorted((a, b), key=len)
    if len(long) != len(short) + 1:
        return False
    return any(long[:i] + long[i + 1 :] == short for i in range(1, len(long)))


def _places(where: Sequence[str]) -> str:
    """The first few places a label occurs, with 'and N more'."""
    more = f" and {len(where) - MAX_LISTED} more" if len(where) > MAX_LISTED else ""
    return ", ".join(where[:MAX_LISTED]) + more


def _clash_text(clash: LabelClash) -> str:
    """'a' and 'b' differ only by case."""
    names = [repr(n) for n in clash.labels]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed} {clash.reason}"
