"""tpuctl.jobs.owner against the GCS emulator: whose a run id is, and what a launch under it
may overwrite (end to end on local pods: tests/test_cli_jobs_local.py)."""

import json

import pytest

from tpuctl import storage
from tpuctl.errors import TpuctlError
from tpuctl.jobs.owner import RunOwner, claim

RUN_DIR = "gs://test-bucket/runs/old"


def test_a_run_stored_before_owner_records_keeps_its_run_dir_and_its_relaunch_records_it(gcs):
    uri = storage.recipe_uri("test-bucket", "old")
    owner_uri = uri.replace("recipe.yaml", "owner.json")
    storage.upload_text(uri, f"run_dir: {RUN_DIR}\nrun_id: old\n")
    with pytest.raises(TpuctlError, match=f"--run-id old is the run in {RUN_DIR} ") as refused:
        claim(uri, "old", RunOwner("n2", "bob"), "gs://test-bucket/runs/new")
    assert refused.value.exit_code == 2
    assert storage.read_text(owner_uri) is None
    claim(uri, "old", RunOwner("n1", "alice"), f"{RUN_DIR}/")  # the same directory
    assert json.loads(storage.read_text(owner_uri)) == {"node": "n1", "user": "alice"}
    claim(uri, "old", RunOwner("n1", "alice@laptop"), RUN_DIR)  # a babysitter elsewhere
    with pytest.raises(TpuctlError, match=r"is node n1's run \(launched by alice; ") as refused:
        claim(uri, "old", RunOwner("n2", "alice"), RUN_DIR)
    assert refused.value.exit_code == 2


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        (
            "owner.json",
            "{not json",
            "owner.json, which names the node the run belongs to, cannot be read",
        ),
        ("recipe.yaml", "run_dir: [unclosed\n", "recipe.yaml names no run_dir that can be read"),
        ("recipe.yaml", "- a list\n", "recipe.yaml names no run_dir that can be read"),
    ],
)
def test_an_unreadable_run_record_is_refused_in_one_line_and_left_as_it_is(gcs, name, text, says):
    uri = storage.recipe_uri("test-bucket", "odd")
    record = uri.replace("recipe.yaml", name)
    storage.upload_text(record, text)
    with pytest.raises(TpuctlError, match=f"--run-id odd: .*{says}: give this run another") as e:
        claim(uri, "odd", RunOwner("n1", "alice"), RUN_DIR)
    assert e.value.exit_code == 2
    assert storage.read_text(record) == text
