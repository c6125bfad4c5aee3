"""Ownership labels: valid GCP label values, and who a node's labels say it is for."""

import re

import pytest

from tpuctl import ownership

LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("llama-3.1-8b-20261123-141502", "llama-3-1-8b-20261123-141502"),
        ("Hamish.Ivison", "hamish-ivison"),
        ("tiny_run", "tiny_run"),
    ],
)
def test_label_values_follow_the_gcp_rules(text, value):
    assert ownership.label_value(text) == value


def test_long_values_are_cut_to_63_and_stay_distinct():
    first, second = "r" * 70 + "-a", "r" * 70 + "-b"
    values = {ownership.label_value(first), ownership.label_value(second)}
    assert len(values) == 2
    assert all(LABEL_VALUE.match(v) for v in values)


def test_a_nodes_labels_say_whose_and_which_runs_it_is():
    labels = ownership.ownership_labels("Alice", "llama-3.1-8b")
    assert labels == {"tpuctl-user": "alice", "tpuctl-run": "llama-3-1-8b"}
    assert ownership.created_by(labels, "Alice") and not ownership.created_by(labels, "bob")
    assert ownership.created_for_run(labels, "llama-3.1-8b", "alice")
    assert not ownership.created_for_run(labels, "llama-3.1-8b", "bob")  # bob's run of that id
    assert not ownership.created_for_run(labels, "llama-3.1-8b-other", "alice")
    assert not ownership.created_for_run({}, "llama-3.1-8b", "alice")
    assert ownership.someone_elses(labels, "bob") and not ownership.someone_elses(labels, "alice")
    assert not ownership.someone_elses({}, "bob")  # not created by tpuctl: nobody's in particular
    assert ownership.describe_owner(labels) == "labels tpuctl-user=alice, tpuctl-run=llama-3-1-8b"
    assert ownership.describe_owner({}) == "no tpuctl labels (not created by tpuctl)"
