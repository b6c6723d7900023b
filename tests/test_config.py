"""The one config parser and the CLI shell: wrong keys and values fail at start-up, by name."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import traceback

import pytest
import yaml

from dualtok.pipelines.io.storage import StorageConfig
from dualtok.pipelines.tokenize.config import TokenizeConfig
from dualtok.pipelines.config import ConfigError, SecretStr, load_config, to_dict
from dualtok.pipelines.io.storage import revealed


def test_yaml_and_overrides_map_onto_the_typed_config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("inputs: ['s3://b/shards/{00000..00009}.tar']\noutput: s3://b/corpus\nbundle: tiny\nencoder:\n  batch_size: 8\n")
    config = load_config(TokenizeConfig, path, ["encoder.gpus_per_actor=1", "streams=guide", "storage.region=eu-west-1"])
    assert config.inputs == ["s3://b/shards/{00000..00009}.tar"]
    assert config.encoder.batch_size == 8 and config.encoder.gpus_per_actor == 1.0
    assert config.encoder.actors is None and config.prefetch_batches == 4  # defaults (None: sized), from the dataclass only
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
    given = {item.partition("=")[0] for item in overrides}  # a key given twice is an error of its own
    base = [item for item in ["inputs=[a.tar]", "output=out", "bundle=tiny"] if item.partition("=")[0] not in given]
    with pytest.raises(ConfigError, match=message):
        load_config(TokenizeConfig, None, [*base, *overrides])


KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalr: XUtnFEMI/K7MDENG#{bPxRfiCY}0x1F"  # YAML would mangle it


def test_secrets_never_leave_through_to_dict():
    config = load_config(TokenizeConfig, None, ["inputs=[a.tar]", "output=o", "bundle=tiny", f"storage.key={KEY}",
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
    assert load_config(TokenizeConfig, None, ["inputs=[a.tar]", "output=o", "bundle=tiny", "storage.secret="]).storage.secret is None
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
    overrides = ["inputs=[a.tar]", "output=o", "bundle=tiny"]
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

    from dualtok.pipelines.audit.config import AuditConfig
    from dualtok.pipelines.audit.config import plan_from_config as audit_plan
    from dualtok.pipelines.tokenize.config import plan_from_config as tokenize_plan
    from dualtok.pipelines.train.config import STAGE_CONFIGS
    from dualtok.pipelines.train.plan import plan_training

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
    version = subprocess.run([sys.executable, "-m", "dualtok.jobs.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("dualtok 0.")
    presets = subprocess.run([sys.executable, "-m", "dualtok.jobs.cli", "presets"], capture_output=True, text=True)
    assert presets.returncode == 0
    assert [line.split()[0] for line in presets.stdout.splitlines() if not line.startswith(" ")] == [
        "tiny", "small", "paper"]


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dualtok.jobs.cli", "tokenize", "inputs=[a.tar]", "output=o", "typo=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown config key 'typo'" in result.stderr and "Traceback" not in result.stderr


def _tokenize_default(section: str, key: str) -> object:
    return getattr(TokenizeConfig.__dataclass_fields__[section].default, key)


def test_a_scalar_key_given_twice_fails_naming_both_values_and_a_list_key_appends(tmp_path, capsys):
    from dualtok.jobs.cli import main

    code = main(["tokenize", "inputs=a.tar", "output=s3://b/00000", "output=s3://b/00001", "bundle=tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "output given twice: 'output=s3://b/00000' and 'output=s3://b/00001'" in err
    assert "quote it" in err.lower() and "Traceback" not in err
    path = tmp_path / "job.yaml"
    path.write_text("inputs: [y.tar]\noutput: from-yaml\nbundle: tiny\n")
    config = load_config(TokenizeConfig, path, ["inputs=a.tar", "inputs=[b.tar, c.tar]", "output=o"])
    assert config.inputs == ["a.tar", "b.tar", "c.tar"] and config.output == "o"  # an override replaces YAML once
    with pytest.raises(ConfigError, match=r"encoder.batch_size given twice: 'encoder=\{batch_size: 8\}'"):
        load_config(TokenizeConfig, path, ["encoder={batch_size: 8}", "encoder.batch_size=4"])
    with pytest.raises(ConfigError, match=r"storage.secret given twice: 'storage.secret=\*\*\*' and") as err:
        load_config(TokenizeConfig, path, [f"storage.secret={SECRET}", "storage.secret=other"])
    assert SECRET not in str(err.value) and "other" not in str(err.value)


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    from dualtok.jobs.cli import main
    from dualtok.pipelines.config import config_keys

    with pytest.raises(SystemExit) as done:
        main(["tokenize", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert f"encoder.batch_size (int, default {_tokenize_default('encoder', 'batch_size')})" in out
    assert "inputs (list[str], default [])\n      tar (.tar, .tar.gz, .tgz) or Parquet (.parquet) shards: prefixes" in out
    assert "storage.secret (secret str | null, default (not shown))" in out and "guide.batch_size" not in out
    assert all(f"  {k.key} (" in out for k in config_keys(TokenizeConfig))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "codebook: keys it adds or whose defaults differ:\n  batch_size (int, default 256)" in out
    assert "  dead_code_every (int, default 100)" in out and "  lr (float, default 0.0001)" in out


def test_every_key_of_every_job_says_what_it_means():
    """`--help` shows each key's meaning from its `# comment`: no job key may go without one, and a
    type checker's pragma is not a meaning."""
    import importlib

    from dualtok.jobs.kinds import KINDS
    from dualtok.jobs.manifests import ManifestsConfig
    from dualtok.jobs.stats import StatsConfig
    from dualtok.pipelines.config import config_keys
    from dualtok.pipelines.sequences.export import ExportConfig

    types = [getattr(importlib.import_module(k.config_type.split(":")[0]), k.config_type.split(":")[1])
             for k in KINDS.values()] + [StatsConfig, ManifestsConfig, ExportConfig]
    keys = [(t.__name__, key) for t in types for key in config_keys(t)]
    assert len(keys) > 150
    assert [(name, key.key) for name, key in keys if not key.meaning] == []
    assert not [key.key for _, key in keys if "type: ignore" in key.meaning]


def test_print_config_prints_the_resolved_yaml_in_either_dialect_without_ray(capsys):
    import ray

    from dualtok.jobs.cli import main

    ray_before = ray.is_initialized()  # the session's Ray may run already: printing must not start one
    code = main(["tokenize", "inputs=a.tar", "--output", "s3://b/corpus", "--encoder.batch_size=8", "--storage.anon",
                 "bundle=tiny", f"--storage.secret={SECRET}", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and ray.is_initialized() == ray_before
    assert printed["inputs"] == ["a.tar"] and printed["output"] == "s3://b/corpus" and printed["bundle"] == "tiny"
    assert printed["encoder"]["batch_size"] == 8 and printed["storage"]["anon"] is True
    assert printed["storage"]["secret"] == "***" and printed["storage"]["key"] is None
    assert printed["image"]["max_pixels"] == _tokenize_default("image", "max_pixels")
    assert main(["train", "codebook", "inputs=s", "output=o", "storage_path=r", "bundle=tiny", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["batch_size"] == 256  # the stage's own default


def test_a_misspelt_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size' \(did you mean 'encoder.batch_size'\?\)"):
        load_config(TokenizeConfig, None, ["inputs=a.tar", "output=o", "bundle=tiny", "batch_size=8"])
    with pytest.raises(ConfigError, match=r"encoder.'batchsize' \(did you mean 'encoder.batch_size'\?\)"):
        load_config(TokenizeConfig, None, ["inputs=a.tar", "output=o", "bundle=tiny", "encoder.batchsize=8"])


def test_flag_commands_take_key_value_and_global_flags_go_anywhere(tmp_path, capsys):
    from dualtok.jobs.cli import main, parse_args

    args = parse_args(["shards", "sample_photos=2", f"output={tmp_path}", "per_shard=1", "overwrite=true", "-q"])
    shown = (args.output, args.sample_photos, args.per_shard, args.overwrite, args.quiet)
    assert shown == (str(tmp_path), 2, 1, True, True)
    assert main(["shards", "-q", "sample_photos=2", f"output={tmp_path}", "per_shard=1"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]
    args = parse_args(["tokenize", "inputs=a.tar", "-vv", "--json", "--log-level", "WARNING", "output=o"])
    shown = (args.verbose, args.json, args.log_level, args.overrides)
    assert shown == (2, True, "WARNING", ["inputs=a.tar", "output=o"])
    with pytest.raises(SystemExit) as done:
        parse_args(["shards", "overwrite=maybe", "output=x"])
    assert done.value.code == 2 and "overwrite is a switch" in capsys.readouterr().err


@pytest.mark.parametrize("text", [None, "- a.tar\n- b.tar\n"])
def test_a_missing_or_non_mapping_config_file_is_one_line(text, tmp_path, capsys):
    from dualtok.jobs.cli import main

    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["tokenize", "-c", str(path), "bundle=tiny"]) == 2
    err = capsys.readouterr().err
    expected = "does not exist" if text is None else "must be a YAML mapping of keys, got list"
    assert err.count("\n") == 1 and str(path) in err and expected in err and "Traceback" not in err
