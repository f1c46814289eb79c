"""HNetConfig validation: every user-fixable mistake raises HNetConfigError naming what is wrong."""

import copy
import re

import pytest
import torch

from hnet import FLAVORS, HNetConfig, HNetConfigError, HNetForCausalLM


def base() -> dict:
    """A valid 1-stage config (the debug flavor) to break one key at a time."""
    return copy.deepcopy(FLAVORS["debug"])


def with_changes(**changes) -> dict:
    d = base()
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            d[outer][inner] = value
        else:
            d[key] = value
    return d


def raises(pattern: str):
    return pytest.raises(HNetConfigError, match=pattern)


def test_error_is_a_value_error():
    assert issubclass(HNetConfigError, ValueError)


@pytest.mark.parametrize("bad", ["m4x", "", "4m", "q2", "m", "mm4"])
def test_malformed_layout_string(bad):
    layout = [bad, ["M1T1"], "t1m1"]
    with raises(r"arch_layout\[0\]: " + re.escape(repr(bad)) + " is not a layout string"):
        HNetConfig.from_dict(with_changes(arch_layout=layout))


def test_malformed_layout_string_in_inner_stage_names_its_path():
    with raises(r"arch_layout\[1\]\[0\]: 'T1x' is not a layout string"):
        HNetConfig.from_dict(with_changes(arch_layout=["m1t1", ["T1x"], "t1m1"]))


def test_zero_length_run():
    with raises(r"run m0 has no layers"):
        HNetConfig.from_dict(with_changes(arch_layout=["m0", ["M1T1"], "t1m1"]))


@pytest.mark.parametrize(
    "layout, pattern",
    [
        ([["m1"]], r"arch_layout\[0\]: \['m1'\] is not a layout string"),
        (["m1", ["m1"]], r"arch_layout: expected \[encoder, \[inner\.\.\.\], decoder\] or \[main\]"),
        (["m1t1", "M1T1", "t1m1"], r"arch_layout\[1\]: expected \[encoder, \[inner\.\.\.\], decoder\]"),
        ("m1", r"arch_layout: expected \[encoder"),
        ([], r"arch_layout: expected \[encoder"),
    ],
)
def test_bad_nesting(layout, pattern):
    with raises(pattern):
        HNetConfig.from_dict(with_changes(arch_layout=layout))


@pytest.mark.parametrize(
    "key, value",
    [
        ("d_model", [64]),
        ("d_intermediate", [0, 192, 0]),
        ("attn_cfg.num_heads", [4]),
        ("attn_cfg.rotary_emb_dim", [8, 12, 16]),
        ("attn_cfg.window_size", [15]),
    ],
)
def test_per_stage_list_length_mismatch_names_key(key, value):
    with raises(re.escape(key) + r": expected a list of 2 values \(one per stage of arch_layout\)"):
        HNetConfig.from_dict(with_changes(**{key: value}))


def test_per_stage_values_must_be_integers():
    with raises(r"d_model: expected integers"):
        HNetConfig.from_dict(with_changes(d_model=[64, 96.0]))


def test_d_model_not_divisible_by_heads():
    with raises(r"attn_cfg\.num_heads\[0\] = 5: d_model\[0\] = 64 is not divisible by it"):
        HNetConfig.from_dict(with_changes(**{"attn_cfg.num_heads": [5, 4]}))


def test_d_model_incompatible_with_mamba_heads():
    with raises(r"d_model\[1\] = 80: .*Mamba2 head dim 64"):
        HNetConfig.from_dict(with_changes(d_model=[64, 80]))


@pytest.mark.parametrize("rot, pattern", [(7, r"= 7: must be even"), (18, r"= 18: .*at most the head dim 16")])
def test_rotary_dim(rot, pattern):
    with raises(r"attn_cfg\.rotary_emb_dim\[0\] " + pattern):
        HNetConfig.from_dict(with_changes(**{"attn_cfg.rotary_emb_dim": [rot, 12]}))


def test_rotary_dim_equal_to_head_dim_is_fine():
    HNetConfig.from_dict(with_changes(**{"attn_cfg.rotary_emb_dim": [16, 24]}))


def test_widths_shrinking_inward():
    with raises(r"d_model: widths never shrink inward, but d_model\[1\] = 64 < d_model\[0\]"):
        HNetConfig.from_dict(with_changes(d_model=[128, 64]))


def test_bad_window():
    with raises(r"attn_cfg\.window_size\[1\] = -2"):
        HNetConfig.from_dict(with_changes(**{"attn_cfg.window_size": [15, -2]}))


def test_unknown_top_level_key():
    d = base()
    d["d_modle"] = [64, 96]
    with raises(r"unknown key 'd_modle'.*valid keys: .*d_model"):
        HNetConfig.from_dict(d)


@pytest.mark.parametrize("section, valid", [("ssm_cfg", "d_state"), ("attn_cfg", "num_heads")])
def test_unknown_nested_key_names_section_and_key(section, valid):
    d = base()
    d[section]["bogus_knob"] = 1
    with raises(re.escape(section) + r"\.'?bogus_knob.*valid keys: .*" + valid):
        HNetConfig.from_dict(d)


@pytest.mark.parametrize("section", ["ssm_cfg", "attn_cfg"])
def test_nested_section_not_an_object(section):
    with raises(section + r": expected an object"):
        HNetConfig.from_dict(with_changes(**{section: [1, 2]}))


def test_non_positive_ssm_value():
    with raises(r"ssm_cfg\.chunk_size must be positive"):
        HNetConfig.from_dict(with_changes(**{"ssm_cfg.chunk_size": 0}))


def test_unknown_flavor():
    with raises(r"unknown model flavor 'hnet_3stage'.*valid flavors: .*hnet_1stage_L"):
        HNetConfig.from_flavor("hnet_3stage")


def test_mlp_block_without_d_intermediate():
    with raises(r"d_intermediate\[1\] = 0 but arch_layout stage 1 has upper-case \(MLP\) blocks"):
        HNetConfig.from_dict(with_changes(d_intermediate=[0, 0]))
    with raises(r"d_intermediate\[0\] = 0 but arch_layout stage 0"):
        HNetConfig.from_dict(with_changes(arch_layout=["M1t1", ["M1T1"], "t1m1"]))


def test_byte_vocab_and_untied_only():
    with raises(r"vocab_size = 512"):
        HNetConfig.from_dict(with_changes(vocab_size=512))
    with raises(r"tie_embeddings"):
        HNetConfig.from_dict(with_changes(tie_embeddings=True))


def test_from_json_errors(tmp_path):
    with raises(r"model config file not found: .*missing\.json"):
        HNetConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with raises(r"bad\.json: not valid JSON"):
        HNetConfig.from_json(bad)


def test_from_dict_does_not_mutate_input():
    d = base()
    snapshot = copy.deepcopy(d)
    HNetConfig.from_dict(d)
    assert d == snapshot


def test_valid_tiny_custom_config_builds_and_runs():
    config = HNetConfig.from_dict(
        {
            "arch_layout": ["t1", ["m1"], "m1"],
            "d_model": [32, 64],
            "d_intermediate": [0, 0],
            "ssm_cfg": {"d_state": 8, "chunk_size": 16},
            "attn_cfg": {"num_heads": [2, 2], "rotary_emb_dim": [4, 0], "window_size": [-1, 7]},
        }
    )
    assert config.num_stages == 2
    assert config.ssm_cfg.d_conv == 4 and config.ssm_cfg.expand == 2  # defaults filled in
    assert config.n_residuals() == [2, 3]
    assert HNetConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()

    torch.manual_seed(0)
    model = HNetForCausalLM(config)
    model.init_weights()
    lengths = [5, 1, 30]
    ids = torch.randint(0, 256, (sum(lengths),))
    cu = torch.tensor([0, 5, 6, 36], dtype=torch.int32)
    out = model(ids, cu)
    assert out.logits.shape == (36, 256) and torch.isfinite(out.logits).all()
    assert len(out.router_outputs) == 1 and out.router_outputs[0].boundary_prob.shape == (36,)
    inner = out.stage_cu_seqlens[1]
    assert int(inner[-1]) == int(out.router_outputs[0].boundary_mask.sum())
    assert model.backbone.pad_dimension is None and model.backbone.main_network.pad_dimension.shape == (32,)
