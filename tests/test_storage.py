"""tpuctl.storage against the GCS emulator, with the real google-cloud-storage client."""

import pytest

from tpuctl import storage
from tpuctl.errors import TpuctlError


def test_recipe_uri_layout():
    assert storage.recipe_uri("gs://b/", "r1") == "gs://b/tpuctl/runs/r1/recipe.yaml"


def test_upload_then_read_back_creating_the_bucket_on_the_emulator(gcs):
    uri = storage.recipe_uri("fresh-bucket", "run-1")
    assert storage.read_text(uri) is None
    storage.upload_text(uri, "run_dir: x\n")
    assert storage.read_text(uri) == "run_dir: x\n"
    assert sorted(b.name for b in gcs.client().list_buckets()) == ["fresh-bucket", "test-bucket"]


@pytest.mark.parametrize("bad", ["", "gs://", "a/b"])
def test_bad_bucket_setting_is_a_one_line_error(bad):
    with pytest.raises(TpuctlError, match="tpuctl config set bucket"):
        storage.bucket_name(bad)
