"""Every setting is documented in the README, with its variable and flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deployhub.cli import build_parser
from deployhub.settings import Settings, SettingsError, env_name, readme_rows

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Settings)])
def test_setting_is_in_the_readme_table(field: str) -> None:
    flag = "--" + field.replace("_", "-")
    assert f"| `{env_name(field)}` | `{flag}` |" in README
    assert flag in _serve_help()


def test_the_readme_table_is_the_settings_whole_rows() -> None:
    """Name, flag, default and meaning of every setting, in order: a changed default or help
    text fails here until the README says the same."""
    table = [line for line in README.splitlines() if line.startswith("| `DEPLOYHUB_")]
    assert table == readme_rows()


def _serve_help() -> str:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return str(action.choices["serve"].format_help())  # type: ignore[union-attr]


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(SettingsError, match="DEPLOYHUB_PORT must be a number"):
        Settings.from_env({"DEPLOYHUB_PORT": "eighty"})
    with pytest.raises(SettingsError, match="DEPLOYHUB_S3_BUCKET"):
        Settings.from_env({"DEPLOYHUB_STORAGE": "s3"})
    for loopback in ("127.0.0.1", "localhost", "[::1]", "127.1.2.3"):
        with pytest.raises(SettingsError, match="the build's own loopback"):
            Settings.from_env({"DEPLOYHUB_BUILD_ALLOW_HOSTS": f"registry.internal,{loopback}"})
    allowed = Settings.from_env({"DEPLOYHUB_BUILD_ALLOW_HOSTS": "registry.internal,10.0.0.8"})
    assert allowed.build_allow_hosts == ("registry.internal", "10.0.0.8")


def test_secrets_never_print() -> None:
    settings = Settings.from_env({"DEPLOYHUB_REDIS_URL": "redis://:hunter2@db:6379/0"})
    assert "hunter2" not in repr(settings)
    assert settings.to_env()["DEPLOYHUB_REDIS_URL"].endswith("hunter2@db:6379/0")
