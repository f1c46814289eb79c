"""JobConfig: precedence, CLI syntax, TOML loading, error messages and the TOML round trip."""

import re

import pytest

from hnet_titan.config import ConfigError, JobConfig


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def raises(match: str):
    return pytest.raises(ConfigError, match=re.escape(match))


def test_defaults_are_valid_and_match_empty_cli():
    cfg = JobConfig.from_args([])
    assert cfg == JobConfig()
    assert cfg.training.steps == 200
    assert cfg.optimizer.lr_multipliers == "auto"
    assert cfg.optimizer.no_weight_decay == ["*norm*", "*bias", "A_log", "D", "pad_dimension"]
    assert cfg.loss.ratio_targets == [6.0]


def test_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("form", ["space", "equals"])
def test_precedence_cli_over_toml_over_defaults(tmp_path, form):
    path = write(tmp_path, "[training]\nsteps = 50\nseq_len = 256\n[optimizer]\nlr = 1e-3\n")
    override = ["--training.steps", "70"] if form == "space" else ["--training.steps=70"]
    cfg = JobConfig.from_args(["--job.config_file", path, *override])
    assert cfg.training.steps == 70  # CLI
    assert cfg.training.seq_len == 256  # TOML
    assert cfg.optimizer.lr == 1e-3  # TOML
    assert cfg.training.local_batch_size == 8  # default
    assert cfg.job.config_file == path


def test_config_file_position_does_not_matter(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 50\n")
    cfg = JobConfig.from_args(["--training.steps", "70", f"--job.config_file={path}"])
    assert cfg.training.steps == 70


def test_dashes_read_as_underscores():
    assert JobConfig.from_args(["--training.local-batch-size", "4"]).training.local_batch_size == 4


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--checkpoint.enable"], True),
        (["--checkpoint.enable", "true"], True),
        (["--checkpoint.enable=True"], True),
        (["--checkpoint.enable", "false"], False),
        (["--checkpoint.enable", "--checkpoint.no_enable"], False),
        (["--checkpoint.no_enable", "--checkpoint.enable"], True),
    ],
)
def test_bool_forms(argv, expected):
    assert JobConfig.from_args(argv).checkpoint.enable is expected


def test_negated_flag_overrides_toml(tmp_path):
    path = write(tmp_path, "[metrics]\nenable_tensorboard = true\n")
    cfg = JobConfig.from_args(["--job.config_file", path, "--metrics.no_enable_tensorboard"])
    assert cfg.metrics.enable_tensorboard is False


def test_bool_flag_followed_by_another_option():
    cfg = JobConfig.from_args(["--compile.enable", "--training.steps", "3"])
    assert cfg.compile.enable is True and cfg.training.steps == 3


def test_negative_numbers_are_values():
    cfg = JobConfig.from_args(["--training.seed", "-1", "--training.max_norm", "-1"])
    assert cfg.training.seed == -1 and cfg.training.max_norm == -1.0


def test_list_parsing():
    cfg = JobConfig.from_args(
        ["--loss.ratio_targets", "3,2.5", "--data.sources", "a.txt, b/,*.jsonl", "--checkpoint.exclude_from_loading="]
    )
    assert cfg.loss.ratio_targets == [3.0, 2.5]
    assert all(isinstance(x, float) for x in cfg.loss.ratio_targets)
    assert cfg.data.sources == ["a.txt", "b/", "*.jsonl"]
    assert cfg.checkpoint.exclude_from_loading == []


def test_empty_list_overrides_toml(tmp_path):
    path = write(tmp_path, '[data]\nsources = ["x.txt"]\n[activation_checkpoint]\nper_stage = ["full"]\n')
    cfg = JobConfig.from_args(["--job.config_file", path, "--data.sources", ""])
    assert cfg.data.sources == []
    assert cfg.activation_checkpoint.per_stage == ["full"]


@pytest.mark.parametrize(
    "toml, expected",
    [('lr_multipliers = "auto"', "auto"), ("lr_multipliers = [4, 2.0, 1]", [4.0, 2.0, 1.0])],
)
def test_lr_multipliers_from_toml(toml, expected):
    cfg = JobConfig.from_toml_string(f"[optimizer]\n{toml}\n")
    assert cfg.optimizer.lr_multipliers == expected
    assert expected == "auto" or all(isinstance(m, float) for m in cfg.optimizer.lr_multipliers)


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("4.0,2.0,1.0", [4.0, 2.0, 1.0]), ("2", [2.0])])
def test_lr_multipliers_from_cli(text, expected):
    assert JobConfig.from_args(["--optimizer.lr_multipliers", text]).optimizer.lr_multipliers == expected


def test_toml_int_is_accepted_for_float():
    cfg = JobConfig.from_toml_string("[optimizer]\nlr = 1\n")
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trainng.steps", "5"], "unknown section 'trainng'; did you mean 'training'?"),
        (["--training.stpes", "5"], "unknown key 'training.stpes'; did you mean 'training.steps'?"),
        (["--training.lr", "1"], "unknown key 'training.lr'; did you mean 'optimizer.lr'?"),
        (["--steps", "5"], "unknown section 'steps'; did you mean 'training.steps' or 'validation.steps'?"),
        (["--zzz.q", "5"], "unknown section 'zzz'; valid sections: job, model, training,"),
        (["--training.zzz", "5"], "unknown key 'training.zzz'; valid keys in [training]: local_batch_size,"),
        (["--training.no_steps"], "unknown key 'training.no_steps'"),
        (["--training.steps", "abc"], "training.steps: expected int, got 'abc'"),
        (["--training.steps", "1.5"], "training.steps: expected int, got '1.5'"),
        (["--training.steps", "true"], "training.steps: expected int, got 'true'"),
        (["--optimizer.lr", "fast"], "optimizer.lr: expected float, got 'fast'"),
        (["--checkpoint.enable", "1"], "checkpoint.enable: expected bool (true or false), got '1'"),
        (["--loss.ratio_targets", "3,x"], "loss.ratio_targets: expected float, got 'x'"),
        (
            ["--optimizer.lr_multipliers", "fast"],
            "optimizer.lr_multipliers: expected 'auto' or list[float], got 'fast'",
        ),
        (
            ["--lr_scheduler.decay_type", "cubic"],
            "lr_scheduler.decay_type: invalid choice 'cubic'; valid choices: linear, cosine, sqrt, inverse_sqrt",
        ),
        (
            ["--activation_checkpoint.per_stage", "full,some"],
            "activation_checkpoint.per_stage: invalid choice 'some'; valid choices: none, full, every_n",
        ),
        (["--training.steps"], "training.steps: missing value (expected int)"),
        (["steps"], "unexpected argument 'steps'"),
        (["--checkpoint.no_enable=true"], "--checkpoint.no_enable is a flag and takes no value"),
    ],
)
def test_cli_errors(argv, message):
    with raises(message):
        JobConfig.from_args(argv)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[trainng]\nsteps = 5", "unknown section 'trainng'; did you mean 'training'?"),
        ("[training]\nstpes = 5", "unknown key 'training.stpes'; did you mean 'training.steps'?"),
        ("steps = 5", "unknown section 'steps'; did you mean 'training.steps' or 'validation.steps'?"),
        ("training = 5", "training: expected a table of fields, got 5"),
        ('[training]\nsteps = "abc"', "training.steps: expected int, got 'abc'"),
        ("[training]\nsteps = [1, 2]", "training.steps: expected int, got [1, 2]"),
        ("[training]\nsteps = true", "training.steps: expected int, got True"),
        ("[training]\nsteps = 2.0", "training.steps: expected int, got 2.0"),
        ("[checkpoint]\nenable = 1", "checkpoint.enable: expected bool, got 1"),
        ("[optimizer]\nlr = true", "optimizer.lr: expected float, got True"),
        ("[job]\ndescription = 3", "job.description: expected str, got 3"),
        ('[data]\nsources = "a.txt"', "data.sources: expected list[str], got 'a.txt'"),
        ('[loss]\nratio_targets = [3, "x"]', "loss.ratio_targets: expected float, got 'x'"),
        ("[optimizer]\nlr_multipliers = 3", "optimizer.lr_multipliers: expected 'auto' or list[float], got 3"),
        (
            '[model]\nssd_backend = "cuda"',
            "model.ssd_backend: invalid choice 'cuda'; valid choices: auto, torch, triton",
        ),
        ("[model]\nssd_backend = 1", "model.ssd_backend: expected 'auto' or 'torch' or 'triton', got 1"),
    ],
)
def test_toml_errors(tmp_path, toml, message):
    with raises(message):
        JobConfig.from_toml_string(toml)
    with raises(message):
        JobConfig.from_args(["--job.config_file", write(tmp_path, toml)])


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with raises(f"job.config_file: cannot read {path!r}: No such file or directory"):
        JobConfig.from_args(["--job.config_file", path])


def test_malformed_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[training\nsteps = 5\n")
    with raises(f"malformed TOML in {path!r}"):
        JobConfig.from_args(["--job.config_file", path])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--training.steps", "0"], "training.steps must be >= 1, got 0"),
        (["--training.seq_len", "0"], "training.seq_len must be >= 1, got 0"),
        (["--training.local_batch_size", "-2"], "training.local_batch_size must be >= 1, got -2"),
        (["--metrics.log_freq", "0"], "metrics.log_freq must be >= 1, got 0"),
        (["--optimizer.lr", "0"], "optimizer.lr must be > 0, got 0.0"),
        (["--optimizer.beta2", "1"], "optimizer.beta2 must be in [0, 1), got 1.0"),
        (["--data.val_fraction", "nan"], "data.val_fraction must be in [0, 1), got nan"),
        (["--parallelism.data_parallel_shard_degree", "0"], "data_parallel_shard_degree must be -1 or >= 1, got 0"),
        (
            ["--training.global_batch_size", "12"],
            "training.global_batch_size (12) must be a multiple of training.local_batch_size (8)",
        ),
        (
            ["--lr_scheduler.warmup_fraction", "0.9"],
            "lr_scheduler: warmup (0.9 of training.steps) + decay_fraction (0.2) must be <= 1",
        ),
        (
            ["--lr_scheduler.warmup_steps", "190"],
            "lr_scheduler: warmup (0.95 of training.steps) + decay_fraction (0.2) must be <= 1",
        ),
        (["--lr_scheduler.warmup_steps", "201"], "lr_scheduler.warmup_steps (201) exceeds training.steps (200)"),
        (["--optimizer.lr_multipliers", "2,0"], "optimizer.lr_multipliers must be 'auto' or a non-empty list"),
        (["--optimizer.lr_multipliers", ""], "optimizer.lr_multipliers must be 'auto' or a non-empty list"),
        (["--model.attn_backend", "flex", "--compile.enable"], "model.attn_backend 'flex' cannot run inside compiled"),
        (["--activation_checkpoint.when_longer_than", "-1"], "activation_checkpoint.when_longer_than must be >= 0"),
        (["--model.mamba_graph_max_positions", "-1"], "model.mamba_graph_max_positions must be >= 0"),
        (["--loss.ratio_targets", "6,0.5"], "loss.ratio_targets must be a non-empty list of values >= 1"),
        (["--loss.ratio_targets", ""], "loss.ratio_targets must be a non-empty list of values >= 1"),
        (
            ["--fault_tolerance.replica_id", "2", "--fault_tolerance.group_size", "2"],
            "fault_tolerance.replica_id (2) must be < fault_tolerance.group_size (2)",
        ),
    ],
)
def test_cross_field_validation(argv, message):
    with raises(message):
        JobConfig.from_args(argv)


def test_wsd_fraction_sum_only_applies_to_wsd():
    cfg = JobConfig.from_args(["--lr_scheduler.name", "cosine", "--lr_scheduler.warmup_fraction", "0.9"])
    assert cfg.lr_scheduler.warmup_fraction == 0.9


def test_validate_catches_direct_assignment():
    cfg = JobConfig()
    cfg.lr_scheduler.decay_type = "cubic"
    with raises("lr_scheduler.decay_type: invalid choice 'cubic'"):
        cfg.validate()
    cfg = JobConfig()
    cfg.training.steps = "10"
    with raises("training.steps: expected int, got '10'"):
        cfg.validate()


def test_toml_round_trip():
    cfg = JobConfig.from_args(
        [
            "--job.description", 'quote " backslash \\ newline \n tab \t del \x7f unicode é',
            "--optimizer.lr_multipliers", "4.0,2.0,1.0",
            "--optimizer.eps", "1e-12",
            "--loss.ratio_targets", "3,6",
            "--data.sources", "a.txt,hf:some/name",
            "--activation_checkpoint.per_stage", "full,none",
            "--checkpoint.enable",
            "--metrics.no_save_jsonl",
            "--training.seed", "-7",
        ]
    )  # fmt: skip
    text = cfg.to_toml()
    assert "[training]\n" in text and "seed = -7\n" in text
    back = JobConfig.from_toml_string(text)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert JobConfig.from_toml_string(JobConfig().to_toml()) == JobConfig()


def test_to_dict_is_two_level():
    d = JobConfig().to_dict()
    assert d["training"]["steps"] == 200
    assert d["optimizer"]["lr_multipliers"] == "auto"
    assert set(d) >= {"job", "model", "training", "data", "fault_tolerance"}
