"""The accelerator catalogue: hosts, chips, cores, runtime and queued-resource needs."""

import pytest

from tpuctl import catalog
from tpuctl.errors import TpuctlError


@pytest.mark.parametrize(
    ("name", "hosts", "chips_per_host", "cores_per_host"),
    [
        ("v2-8", 1, 4, 8),
        ("v2-512", 64, 4, 8),
        ("v3-8", 1, 4, 8),
        ("v3-32", 4, 4, 8),
        ("v3-256", 32, 4, 8),
        ("v3-2048", 256, 4, 8),
        ("v4-8", 1, 4, 8),
        ("v4-4096", 512, 4, 8),
        ("v5litepod-1", 1, 1, 1),
        ("v5litepod-8", 1, 8, 8),
        ("v5litepod-16", 4, 4, 4),
        ("v5p-16", 2, 4, 8),
        ("v6e-256", 64, 4, 4),
    ],
)
def test_shapes(name, hosts, chips_per_host, cores_per_host):
    accelerator = catalog.parse(name)
    assert (accelerator.hosts, accelerator.chips_per_host, accelerator.cores_per_host) == (
        hosts,
        chips_per_host,
        cores_per_host,
    )


def test_v5e_is_an_alias_and_names_are_case_insensitive():
    assert catalog.parse("v5e-16").name == "v5litepod-16"
    assert catalog.parse(" V3-32 ").name == "v3-32"


def test_runtime_versions_per_generation():
    assert catalog.parse("v3-8").runtime_version == "tpu-ubuntu2204-base"
    assert catalog.parse("v5e-8").runtime_version == "v2-alpha-tpuv5-lite"
    assert catalog.parse("v5p-8").runtime_version == "v2-alpha-tpuv5"
    assert catalog.parse("v6e-8").runtime_version == "v2-alpha-tpuv6e"


def test_which_types_need_queued_resources():
    assert not catalog.parse("v3-256").needs_queued(spot=True)
    assert not catalog.parse("v4-8").needs_queued()
    assert catalog.parse("v4-32").needs_queued()
    assert not catalog.parse("v5e-8").needs_queued()
    assert catalog.parse("v5e-8").needs_queued(spot=True)
    assert catalog.parse("v6e-16").needs_queued()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("v3-12", "'v3-12' is not a v3 slice size; nearest valid: v3-8 or v3-32"),
        ("v3-4096", "nearest valid: v3-1024 or v3-2048"),
        ("v9-8", "unknown TPU generation 'v9' in 'v9-8'"),
        ("v5ee-8", "did you mean v5e-8"),
        ("tpu", "accelerator type 'tpu' is not NAME-SIZE"),
    ],
)
def test_bad_names_get_the_nearest_valid_ones(name, message):
    with pytest.raises(TpuctlError) as error:
        catalog.parse(name)
    assert message in str(error.value)


def test_all_types_parse_back_to_themselves():
    every = catalog.all_types()
    assert len(every) > 50
    assert all(catalog.parse(t.name) == t for t in every)
