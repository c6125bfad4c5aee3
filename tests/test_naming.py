"""Default node names (USER-TYPE) and the TPU API's node-id rules."""

import re

import pytest

from tpuctl.errors import TpuctlError
from tpuctl.naming import default_node_name, validate_node_name, validate_run_id


def test_default_name_is_user_dash_type():
    assert default_node_name("alice", "v3-256") == "alice-v3-256"
    assert default_node_name("Hamish.Ivison", "v3-8") == "hamish-ivison-v3-8"
    assert default_node_name("9lives", "v4-8") == "u9lives-v4-8"


def test_long_user_names_are_cut_to_63_characters_keeping_the_type():
    """The type was cut off instead: `up v4-32` then named the user's v4-8 node."""
    name = default_node_name("a" * 80, "v5litepod-256")
    assert len(name) == 63 and name.endswith("a-v5litepod-256")
    assert validate_node_name(name) == name
    assert default_node_name("a" * 70, "v4-8") != default_node_name("a" * 70, "v4-32")
    assert default_node_name("a" * 58 + "-" * 9, "v4-8") == "a" * 58 + "-v4-8"


@pytest.mark.parametrize("name", ["Alice-v3-8", "1node", "node-", "my_node", "a" * 64, "", "pod\n"])
def test_invalid_names_are_refused_with_the_rule(name):
    with pytest.raises(TpuctlError, match="node name"):
        validate_node_name(name)


@pytest.mark.parametrize("run_id", ["llama-3.1-8b-20261123-141502", "tiny_2", "A.b-c", "x"])
def test_run_ids_that_are_one_safe_path_segment_pass(run_id):
    assert validate_run_id(run_id) == run_id


@pytest.mark.parametrize(
    "run_id", ["../../x", "a/b", ".hidden", "", "a b", "run;rm", "nl\n", "a" * 129]
)
def test_other_run_ids_are_refused_naming_the_flag_and_the_rule(run_id):
    with pytest.raises(TpuctlError, match=r"^--run-id .* is not a run id: use at most 128 letters"):
        validate_run_id(run_id)


@pytest.mark.parametrize("stem", [".tiny", "--x", "..", "a" * 300, "llama 3.1/8b"])
def test_every_run_id_run_makes_is_one_the_other_commands_take(stem):
    """`run .tiny.yaml` used to name its run `.tiny-...`, which logs and ps then refused."""
    from tpuctl.jobs import new_run_id

    run_id = new_run_id(stem)
    assert validate_run_id(run_id) == run_id
    assert re.search(r"-[0-9]{8}-[0-9]{6}\Z", run_id) and run_id[0] not in ".-"
