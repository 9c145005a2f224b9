"""Command-line conventions: --version, `-` for standard input, --json everywhere (errors too),
choices listed in --help, completion of spec names, the schema editors get, and dependency pins."""
from __future__ import annotations

import io
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from avdsl import cli
from avdsl.commands.common import complete_spec
from avdsl.loader import builtin_names
from avdsl.schema import schema

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "specs").rglob("*.yaml"))


def test_version_names_avdsl_and_its_dependencies(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0
    assert re.match(r"avdsl \d+\.\d+", out)
    for name in ("torch", "torchaudio", "typer"):
        assert f"{name} " in out


def test_dash_reads_the_spec_from_standard_input(run_cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO((ROOT / "specs" / "tiny" / "zorro.yaml").read_text()))
    code, out, _ = run_cli("build", "-", "--json")
    assert code == 0
    assert json.loads(out)["name"] == "zorro-tiny"


def test_an_error_in_standard_input_shows_its_line(run_cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("avdsl: 1\ninputs:\n  a[B, 4, 4]: fbank\nstreamz: {}\n"))
    code, _, err = run_cli("build", "-")
    assert code == 2
    assert "<stdin>:4:1: unknown key 'streamz'" in err
    assert "   4 | streamz: {}" in err
    assert "did you mean 'streams'?" in err


@pytest.mark.parametrize("argv", [
    ["build", "no-such-spec", "--json"],
    ["lint", "no-such-spec", "--json"],
    ["diff", "zorro", "no-such-spec", "--json"],
    ["build", "zorro", "--set", "encoders.backbone.depth=x", "--json"],
])
def test_with_json_a_spec_error_is_json_on_stdout(run_cli, argv):
    code, out, err = run_cli(*argv)
    assert code == 2
    payload = json.loads(out)
    error = payload["error"] if isinstance(payload, dict) else payload[0]["error"]
    assert error["message"] and error["hint"] and error["line"] >= 1
    assert "Traceback" not in out + err


def test_with_json_a_usage_error_is_json_too(run_cli):
    code, out, _ = run_cli("build", "zorro", "--json", "--precision", "fp16")
    assert code == 2
    assert "fp16" in json.loads(out)["error"]["message"]


def test_argument_errors_take_one_path(run_cli):
    """A bad option, a bad choice and an unknown rule all print one `error:` line and one `hint:` line."""
    for argv in (["build", "zorro", "--precision", "fp16"], ["lint", "--explain", "R999"], ["lint"],
                 ["graph", "zorro", "-o", "x.gif"], ["build", "zorro", "--no-such-option"]):
        code, _, err = run_cli(*argv)
        assert code == 2, argv
        lines = err.splitlines()
        assert sum(line.startswith("error: ") for line in lines) == 1, err
        assert sum(line.startswith("hint: ") for line in lines) == 1, err


@pytest.mark.parametrize("command", ["build", "train"])
def test_precision_choices_are_listed_in_help(run_cli, command):
    _, out, _ = run_cli(command, "--help")
    assert "fp32" in out and "bf16" in out


def test_every_command_with_machine_output_takes_json(run_cli):
    for command in ("build", "lint", "diff", "train", "eval", "bench"):
        _, out, _ = run_cli(command, "--help")
        assert "--json" in out, command


def test_completion_offers_builtin_spec_names():
    assert set(complete_spec("tiny/")) >= {"tiny/zorro", "tiny/mbt"}
    assert "zorro" in complete_spec("zo")
    assert all(name.startswith("mb") for name in complete_spec("mb"))


def test_builtin_names_complete_to_every_shipped_spec():
    assert len(builtin_names()) == len(SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT / "specs")) for p in SHIPPED])
def test_every_shipped_spec_as_written_validates_against_the_editor_schema(path):
    jsonschema.Draft202012Validator(schema()).validate(yaml.safe_load(path.read_text()))


def test_a_spec_without_extends_must_be_complete():
    validator = jsonschema.Draft202012Validator(schema())
    partial = {"avdsl": 1, "streams": {"audio": {"tokenizer": "patch2d(16, 16)"}}}
    messages = [e.message for e in validator.iter_errors(partial)]
    assert any("'inputs' is a required property" in m for m in messages)
    assert validator.is_valid({**partial, "extends": "zorro"})
    assert not validator.is_valid({**partial, "extends": "zorro", "streamz": {}})


def test_schema_has_defaults_and_examples():
    defs = schema()["$defs"]
    assert defs["encoder"]["properties"]["norm_eps"]["default"] == 1e-6
    assert defs["stream"]["properties"]["tokenizer"]["examples"]
    assert all(p.get("description") for p in defs["train"]["properties"].values())


def test_schema_written_to_a_file(run_cli, tmp_path):
    target = tmp_path / "avdsl.schema.json"
    code, _, _ = run_cli("schema", "-o", str(target))
    assert code == 0
    assert json.loads(target.read_text()) == schema()


def test_torch_and_torchaudio_are_pinned_to_one_tested_pair():
    """torchaudio declares no torch pin, but its compiled extension loads only with the torch it was built
    for: both must be pinned exactly, to the same release."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {re.split(r"[=<>!~ ]", d, 1)[0]: d for d in project["dependencies"]}
    torch_pin, audio_pin = pins["torch"], pins["torchaudio"]
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", torch_pin)
    assert re.fullmatch(r"torchaudio==\d+\.\d+\.\d+", audio_pin)
    assert torch_pin.split("==")[1] == audio_pin.split("==")[1]
    assert project["requires-python"] == ">=3.11"


PRIVATE = re.compile(r"\b(typer\._|click\b|torch\._dynamo|torch\._inductor)")


def test_no_private_apis_of_other_packages_in_the_package():
    offenders = []
    for folder in ("avdsl", "runtime"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code, _, comment = line.partition("#")
                # the conventions allow a private API where a comment on that line says why
                if PRIVATE.search(code) and not comment.strip().startswith("private API:"):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_schema_defaults_of_train_settings_are_the_ones_training_uses():
    """The editor schema repeats the training defaults; they must not drift from the code's."""
    from dataclasses import fields

    from avdsl.commands.train import TRAIN_DEFAULTS
    from avdsl.runtime.train import TrainConfig

    used = {f.name: f.default for f in fields(TrainConfig)} | TRAIN_DEFAULTS
    for key, node in schema()["$defs"]["train"]["properties"].items():
        assert node["default"] == used[key], key
