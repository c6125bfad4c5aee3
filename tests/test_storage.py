"""tpuctl.storage against the GCS emulator, with the real google-cloud-storage client."""

import pytest

from tpuctl import storage
from tpuctl.errors import TpuctlError


def test_recipe_uri_layout():
    assert storage.recipe_uri("gs://lab-b/", "r1") == "gs://lab-b/tpuctl/runs/r1/recipe.yaml"


def test_upload_then_read_back_creating_the_bucket_on_the_emulator(gcs):
    uri = storage.recipe_uri("fresh-bucket", "run-1")
    assert storage.read_text(uri) is None
    storage.upload_text(uri, "run_dir: x\n")
    assert storage.read_text(uri) == "run_dir: x\n"
    assert sorted(b.name for b in gcs.client().list_buckets()) == ["fresh-bucket", "test-bucket"]


@pytest.mark.parametrize(
    "bad", ["", "gs://", "a/b", "Bad Bucket!", "ab", "a" * 64, "a..b", "-lab", "lab-", "é-lab"]
)
def test_bad_bucket_setting_is_a_one_line_error(bad):
    """GCS's naming rules, here: google-cloud-storage's ValueError was a traceback."""
    with pytest.raises(TpuctlError, match="tpuctl config set bucket"):
        storage.bucket_name(bad)


@pytest.mark.parametrize("good", ["lab-ckpts", "gs://lab_ckpts/", "a" * 63, "runs.lab.example.com"])
def test_bucket_names_gcs_takes_pass(good):
    assert storage.bucket_name(good) == good.removeprefix("gs://").strip("/")


def test_an_upload_only_if_absent_leaves_an_object_that_exists_alone(gcs):
    """What a run's owner record is written with: of two launches, only one records itself."""
    from google.api_core.exceptions import PreconditionFailed

    uri = "gs://test-bucket/tpuctl/runs/r1/owner.json"
    storage.upload_text(uri, "first\n", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        storage.upload_text(uri, "second\n", if_generation_match=0)
    assert storage.read_text(uri) == "first\n"
