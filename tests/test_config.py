"""The one config parser and the CLI shell: wrong keys and values fail at start-up, by name."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import traceback

import pytest

from jobs.job_config import StorageConfig
from jobs.tokenize import TokenizeConfig
from pipelines.configuration import ConfigError, SecretStr, load_config, to_dict
from pipelines.storage import revealed


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


KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalr: XUtnFEMI/K7MDENG#{bPxRfiCY}0x1F"  # YAML would mangle it


def test_secrets_never_leave_through_to_dict():
    config = load_config(TokenizeConfig, None, ["inputs=[a.tar]", "output=o", f"storage.key={KEY}",
                                                f"storage.secret={SECRET}"])
    options = config.storage.storage_options()
    assert isinstance(options["secret"], SecretStr) and options["secret"].reveal() == SECRET  # taken verbatim
    assert revealed(options) == {"key": KEY, "secret": SECRET}
    written = str(to_dict(config))
    assert SECRET not in written and KEY not in written and written.count("***") == 2
    for shown in (repr(config), str(options), f"{options['secret']}", repr(config.storage)):
        assert SECRET not in shown and KEY not in shown
    copy = pickle.loads(pickle.dumps(options))  # Ray ships plans to workers by pickling them
    assert copy["secret"] == options["secret"] and copy["secret"].reveal() == SECRET
    assert load_config(TokenizeConfig, None, ["inputs=[a.tar]", "output=o", "storage.secret="]).storage.secret is None
    in_code = StorageConfig(key=KEY, secret=SECRET).storage_options()  # plain strings get wrapped too
    assert SECRET not in repr(in_code) and revealed(in_code)["secret"] == SECRET


@pytest.mark.parametrize(("source", "message"), [
    (["storage.secret"], "override 'storage.secret=\\*\\*\\*' must look like key=value"),
    ([f"storage.secret{SECRET}"], "must look like key=value"),
    ([f"storage.secret.x={SECRET}"], "storage.secret: expected a string, got a dict"),
    ("yaml", "storage.secret: expected a string, got a int .quote it; the value is not shown"),
    ("broken yaml", "not valid YAML: .*line 3, column"),
])
def test_config_errors_about_a_secret_never_show_its_value(source, message, tmp_path):
    overrides = ["inputs=[a.tar]", "output=o"]
    path = None
    if source == "yaml":
        path = tmp_path / "job.yaml"
        path.write_text("storage:\n  secret: 123456789012\n")
    elif source == "broken yaml":
        path = tmp_path / "job.yaml"
        path.write_text(f"storage:\n  key: {KEY}\n  secret: {SECRET}: [\n")
    else:
        overrides += source
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TokenizeConfig, path, overrides)
    text = "".join(traceback.format_exception(err.value))  # the chained causes too
    assert SECRET not in text and "123456789012" not in text and "bPxRfiCY" not in text


def test_no_plan_repr_or_stored_train_state_shows_a_credential(tmp_path):
    """Every plan and stage config that holds storage options, as repr shows it and as Ray Train
    stores `train_loop_config` in its run state (its own sanitiser: str() of each value)."""
    from ray.train.v2._internal.state.schema import _to_json_serializable_value

    from jobs.audit import AuditConfig
    from jobs.audit import plan_from_config as audit_plan
    from jobs.tokenize import plan_from_config as tokenize_plan
    from jobs.train import STAGE_CONFIGS
    from jobs.train_plan import plan_training

    creds = [f"storage.key={KEY}", f"storage.secret={SECRET}"]
    tokenize = tokenize_plan(load_config(TokenizeConfig, None, ["inputs=[a.tar]", "output=o", "bundle=tiny", *creds]))
    audit = audit_plan(load_config(AuditConfig, None, ["corpus=c", "output=o", "bundle=tiny", *creds]))
    train = plan_training(load_config(STAGE_CONFIGS["codebook"], None, [
        "inputs=s3://b/shards/", "bundle=tiny", f"output={tmp_path}/out", f"storage_path={tmp_path}/runs", *creds]))
    holders = [tokenize, audit, train, train.worker, train.layout, train.export, train.data, train.worker.source]
    for holder in holders:
        assert SECRET not in repr(holder) and KEY not in repr(holder), type(holder).__name__
        assert "'secret': ***" in repr(holder), type(holder).__name__
    stored = json.dumps(_to_json_serializable_value({"plan": train.worker}))
    assert "WorkerPlan(" in stored and "'secret': ***" in stored and SECRET not in stored and KEY not in stored
    shipped = pickle.loads(pickle.dumps(train.worker))
    assert revealed(shipped.source.storage_options)["secret"] == SECRET


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
