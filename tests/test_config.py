"""The one config parser and the CLI shell: wrong keys and values fail at start-up, by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.tokenize import TokenizeConfig
from pipelines.configuration import ConfigError, load_config, to_dict


def test_yaml_and_overrides_map_onto_the_typed_config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("inputs: ['s3://b/shards/{00000..00009}.tar']\noutput: s3://b/corpus\nencoder:\n  batch_size: 8\n")
    config = load_config(TokenizeConfig, path, ["encoder.gpus_per_actor=1", "streams=guide", "storage.region=eu-west-1"])
    assert config.inputs == ["s3://b/shards/{00000..00009}.tar"]
    assert config.encoder.batch_size == 8 and config.encoder.gpus_per_actor == 1.0
    assert config.encoder.actors == 1 and config.prefetch_batches == 4  # defaults, from the dataclass only
    assert config.streams == "guide" and config.storage.region == "eu-west-1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["encoder.batchsize=8"], "unknown config key encoder.'batchsize'"),
        (["guide.batch_size=8"], "unknown config key 'guide'; valid keys here: .*encoder"),
        (["streams=all"], "streams: 'all' is not one of"),
        (["encoder.batch_size=eight"], "encoder.batch_size: expected an integer"),
        (["encoder.batch_size=0"], "stage resources out of range"),
        (["prefetch_batches=0"], "prefetch_batches and read_actors must be >= 1"),
        (["output="], "output is empty"),
        (["outputs"], "must look like key=value"),
        (["inputs=[s3://b/{0..9}.tar]"], "not valid YAML"),
    ],
)
def test_wrong_keys_and_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TokenizeConfig, None, ["inputs=[a.tar]", "output=out", *overrides])


def test_secrets_never_leave_through_to_dict():
    config = load_config(TokenizeConfig, None, ["inputs=[a.tar]", "output=o", "storage.key=AKIAEXAMPLE",
                                                "storage.secret=very-secret-value"])
    assert config.storage.storage_options()["secret"] == "very-secret-value"
    written = str(to_dict(config))
    assert "very-secret-value" not in written and "AKIAEXAMPLE" not in written and "***" in written
    assert "very-secret-value" not in repr(config)


def test_cli_version_and_presets():
    version = subprocess.run([sys.executable, "-m", "jobs.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("dualtok 0.")
    presets = subprocess.run([sys.executable, "-m", "jobs.cli", "presets"], capture_output=True, text=True)
    assert presets.returncode == 0
    assert [line.split()[0] for line in presets.stdout.splitlines() if not line.startswith(" ")] == [
        "tiny", "small", "paper"]


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "tokenize", "inputs=[a.tar]", "output=o", "typo=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown config key 'typo'" in result.stderr and "Traceback" not in result.stderr
