"""`--config FILE` (YAML or JSON): its keys are the flags, the command line overrides it
(reloading it: tests/test_reload.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.config.load import load_config
from router.config.settings import ConfigError, StaticBackend


def test_yaml_file_holds_the_flags_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "port: 9000\n"
        "static-backends: [http://a:8000, http://b:8000]\n"
        "static_models: [[llama, qwen], whisper]\n"
        "static-aliases: {gpt-4o: llama}\n"
        "routing-logic: roundrobin\n"
        "read-timeout: 30\n"
        "max-body-size: 1GiB\n"
    )
    config = load_config(["--config", str(path), "--port", "9100"])
    assert config.port == 9100  # the flag wins
    assert config.static_backends == (
        StaticBackend("http://a:8000", ("llama", "qwen")),
        StaticBackend("http://b:8000", ("whisper",)),
    )
    assert config.aliases == {"gpt-4o": "llama"}
    assert (config.read_timeout, config.max_body_size) == (30.0, 2**30)
    assert config.config_file == str(path)


def test_json_file_and_boolean_keys(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text(json.dumps({"demo": True, "log-level": "debug"}))
    config = load_config(["--config", str(path)])
    assert (config.demo, config.log_level) == (True, "debug")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("colour: blue\n", "unknown key 'colour'"),
        ("port: abc\nstatic-backends: [http://a:1]\nstatic-models: [m]\n",
         "config file {path}: argument --port: invalid port value: 'abc'"),
        ("demo: yes please\n", "key 'demo' must be true or false"),
        ("- just a list\n", "expected a mapping"),
        ("port: [1\n", "config file {path}:"),
        ("config: other.yaml\n", "unknown key 'config'"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(path)])
    assert expected.format(path=path) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*missing.yaml"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_command_line_flags_replace_repeatable_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("demo: true\ncallbacks: [tests.plugin_examples:Gatekeeper]\n")
    from_file = load_config(["--config", str(path)])
    assert from_file.callbacks == ("tests.plugin_examples:Gatekeeper",)
    overridden = load_config(["--config", str(path),
                              "--callbacks", "tests.plugin_examples:EventCounter"])
    assert overridden.callbacks == ("tests.plugin_examples:EventCounter",)
