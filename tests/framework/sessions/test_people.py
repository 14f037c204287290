"""people: labels grouped by name into persons."""

from __future__ import annotations

import pytest

from ballast.sessions.people import group_labels, name_key, names_by_label


def test_same_name_same_person_first_label_first() -> None:
    people = group_labels(["spk_0", "spk_1", "spk_2", "spk_3"], ["Alice", None, "ALICE", "Bob"])
    assert people.person_of == [0, 1, 0, 2]
    assert [(p.name, p.labels) for p in people.people] == [
        ("Alice", ["spk_0", "spk_2"]), (None, ["spk_1"]), ("Bob", ["spk_3"])]
    assert [p.display_name() for p in people.people] == ["Alice", "spk_1", "Bob"]


def test_without_shared_names_person_ids_are_label_ids() -> None:
    people = group_labels(["a", "b", "c"], ["X", None, "Y"])
    assert people.person_of == [0, 1, 2]
    assert len(people) == 3


def test_names_compare_as_people_read_them() -> None:
    assert name_key("  Mary   Ann ") == name_key("mary ann")
    assert name_key("Ann") != name_key("Anne")
    # Blank names are no names: the label stands alone.
    assert group_labels(["a", "b"], ["  ", "  "]).person_of == [0, 1]


def test_names_by_label_uses_the_persons_spelling() -> None:
    people = group_labels(["a", "b"], ["Alice", "alice"])
    assert names_by_label({"a": "Alice", "b": "alice", "quiet": "Zed"}, people) == {
        "a": "Alice", "b": "Alice", "quiet": "Zed"}


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError):
        group_labels(["a"], [])
