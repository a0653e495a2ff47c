import json
from pathlib import Path

import pytest

from quept.config import PRESET_SPECS, PRESETS, CalibConfig, ConfigError, ElasticSpec, QuEPTConfig


def test_spec_defaults_and_prefixes():
    s = ElasticSpec()
    assert s.bits == (8, 7, 6, 5, 4, 3, 2)
    assert s.group_of(8) == 0 and s.group_of(2) == 3
    # The top group (7-8 bits) has no adapter and fixed clips on the CPU defaults: nothing to
    # train; every lower group trains.
    assert [s.rank_prefix(g) for g in range(4)] == [0, 16, 24, 32]
    assert s.learned_clip_bits == (6, 5, 4, 3, 2)
    assert [s.group_trains(g) for g in range(4)] == [False, True, True, True]
    assert ElasticSpec(ranks=(1, 0, 0, 0), fixed_clip_bits=(7, 8, 6, 5)).group_trains(1) is True
    # Specs without 7 or 8 bits need no fixed_clip_bits of their own.
    two = ElasticSpec(bit_groups=((8,), (4,)), ranks=(0, 2), merge_weights=(0.5, 0.5))
    assert two.learned_clip_bits == (4,) and not two.group_trains(0)


def test_spec_from_a_folder_written_before_fixed_clips_learns_every_clip():
    d = ElasticSpec().to_dict()
    del d["fixed_clip_bits"], d["clip_refine"]
    old = ElasticSpec.from_dict(d)
    assert old.fixed_clip_bits == () and old.clip_refine == 0
    assert ElasticSpec.from_dict(ElasticSpec().to_dict()) == ElasticSpec()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"bit_groups": ((8,), (9,))}, "outside 2..8"),
        ({"bit_groups": ((8, 1),)}, "outside 2..8"),
        ({"bit_groups": ((3,), (8,)), "ranks": (1, 1), "merge_weights": (0.5, 0.5)}, "ordered"),
        ({"ranks": (1, 2)}, "ranks has 2"),
        ({"merge_weights": (0.5, 0.5, 0.5, 0.5)}, "sum to 1"),
        ({"merge_top_p": 1.5}, "merge_top_p"),
        ({"group_size": ((9, 64),)}, "no bit group"),
        ({"default_group_size": -4}, "group size"),
        ({"fixed_clip_bits": (1,)}, "fixed_clip_bits names bit 1"),
        ({"clip_refine": -1}, "clip_refine must be from 0 to 10"),
        ({"clip_init": float("nan")}, "clip_init must be a finite logit"),
    ],
)
def test_spec_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        ElasticSpec(**kw)


def test_config_round_trip():
    cfg = QuEPTConfig(
        spec=ElasticSpec(group_size=((2, 32),), ranks=(1, 2, 3, 4)),
        calib=CalibConfig(n_samples=4, batch_size=2),
    )
    again = QuEPTConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.spec.group_size_for(2) == 32 and again.spec.group_size_for(4) == 64


def test_config_rejects_unknown_version_and_fields():
    d = QuEPTConfig().to_dict()
    with pytest.raises(ConfigError, match="version"):
        QuEPTConfig.from_dict({**d, "version": 99})
    for junk in ([], {**d, "spec": 3}, {"version": 1}):
        with pytest.raises(ConfigError, match="a quept config is a JSON object with 'version'"):
            QuEPTConfig.from_dict(junk)
    with pytest.raises(ConfigError, match="unknown"):
        CalibConfig.from_dict({"n_sample": 3})
    with pytest.raises(ConfigError, match="batch_size"):
        CalibConfig(n_samples=2, batch_size=4)
    for rates in ({"lr_adapter": float("inf")}, {"lr_clip": float("nan")}, {"lr_act": -1.0}):
        with pytest.raises(ConfigError, match=f"{next(iter(rates))} must be a finite rate"):
            CalibConfig(**rates)
    with pytest.raises(ConfigError, match="lr_adapter_groups must be one finite rate >= 0"):
        CalibConfig(lr_adapter_groups=(1e-3, float("inf")))


def test_cli_width_lists_name_a_width_once(capsys):
    from quept.cli import main

    for argv in (["eval", "folder", "--bits", "3,4,3"], ["quantize", "--eval-bits", "3,4,3"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "width 3 is named twice in '3,4,3'" in capsys.readouterr().err
    # an empty list is not "every width" (the option's default): it is refused
    for argv in (["eval", "folder", "--bits", ""], ["quantize", "--eval-bits", "  "]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "expected one or more widths" in capsys.readouterr().err
    for text in ("4,,3", "4,", " , "):  # an empty entry is a typo, not nothing
        with pytest.raises(SystemExit):
            main(["eval", "folder", "--bits", text])
        assert f"expected comma-separated integers, got {text!r}" in capsys.readouterr().err


def test_cli_spec_follows_the_preset_and_the_spec_options():
    from quept.cli import build_parser
    from quept.cli.quantize import _configs

    def spec(*argv):
        return _configs(build_parser().parse_args(["quantize", *argv])).spec

    assert spec() == ElasticSpec()
    paper = spec("--preset", "paper")
    assert paper.ranks == (8, 8, 8, 8) and paper.fixed_clip_bits == ()
    assert all(paper.group_trains(g) for g in range(4))
    long = _configs(build_parser().parse_args(["quantize", "--preset", "cpu-long"]))
    assert long.spec.bit_groups == ((7, 8), (5, 6), (4,), (3,), (2,))
    assert long.spec.ranks == (0, 16, 8, 24, 96) and long.spec.learned_clip_bits == (6, 5, 4, 3, 2)
    assert long.calib.n_samples == 32 and long.calib.epochs == 16 and long.calib.lr_clip == 0.1
    assert long.calib.lr_adapter_groups == (1e-3, 1e-3, 1e-3, 3e-3, 3e-3)
    assert long.calib.massive_ratio == 1000.0 and long.spec.protect_outliers == 100.0
    # A preset's per-group rates fit only its own groups: other groups or one rate drop them.
    for argv in (["--bit-groups", "8/4/2"], ["--lr-adapter", "3e-3"]):
        over = _configs(build_parser().parse_args(["quantize", "--preset", "cpu-long", *argv]))
        assert over.calib.lr_adapter_groups is None, argv
    assert spec("--preset", "cpu-long", "--ranks", "0,8,8,8,8").ranks == (0, 8, 8, 8, 8)
    rates = _configs(build_parser().parse_args(
        ["quantize", "--preset", "cpu-long", "--lr-adapter-groups", "0,1e-3,1e-3,3e-3,5e-3"]))
    assert rates.calib.lr_adapter_groups == (0.0, 1e-3, 1e-3, 3e-3, 5e-3)
    assert spec("--fixed-clip-bits", "").learned_clip_bits == (8, 7, 6, 5, 4, 3, 2)
    assert spec("--protect-outliers", "100").protect_outliers == 100.0
    massive = _configs(build_parser().parse_args(["quantize", "--massive-ratio", "1000"]))
    demo = _configs(build_parser().parse_args(["quantize"]))
    assert demo.calib.bf16 is False
    fast = _configs(build_parser().parse_args(["quantize", "--preset", "cpu-long", "--bf16"]))
    assert fast.calib.bf16 is True and fast.calib.epochs == 16
    from quept.info.describe import _calib_summary
    from quept.info.render import _calib_line
    assert _calib_line("calibrated", _calib_summary(fast.calib)).endswith(
        ", steps in bfloat16")
    assert "bfloat16" not in _calib_line("calibrated", _calib_summary(demo.calib))
    assert massive.calib.massive_ratio == 1000.0 and demo.calib.massive_ratio == 0.0
    assert "massive_ratio" in massive.calib.to_dict()
    assert "massive_ratio" not in demo.calib.to_dict()
    with pytest.raises(ConfigError, match="massive_ratio"):
        CalibConfig(massive_ratio=0.5)
    assert massive.calib.massive_slack == 0.5 and "massive_slack" not in demo.calib.to_dict()
    slack = _configs(build_parser().parse_args(["quantize", "--massive-ratio", "1000",
                                                "--massive-slack", "0.25"]))
    assert slack.calib.to_dict()["massive_slack"] == 0.25
    assert CalibConfig.from_dict(slack.calib.to_dict()) == slack.calib
    with pytest.raises(ConfigError, match="massive_slack"):
        CalibConfig(massive_ratio=1000, massive_slack=1.0)
    with pytest.raises(ConfigError, match="--massive-ratio"):  # a slack with no term to apply to
        _configs(build_parser().parse_args(["quantize", "--massive-slack", "0.25"]))
    assert spec().protect_outliers == 0.0
    with pytest.raises(ConfigError, match="protect_outliers"):
        spec("--protect-outliers", "0.5")
    custom = spec("--bit-groups", "8/4", "--group-size", "32")
    assert custom.ranks == (8, 8) and custom.fixed_clip_bits == () and custom.bits == (8, 4)
    with pytest.raises(ConfigError, match="--fixed-clip-bits names width 7"):
        spec("--bit-groups", "8/4", "--fixed-clip-bits", "7")


def test_cpu_long_preset_is_the_setting_measured_against_peers():
    # docs/peers.md: the preset must be the configuration whose figures it quotes.
    doc = json.loads((Path(__file__).parents[1] / "results/peers.json").read_text())
    cell = doc["cells"]["quept-long16-wide-rates-massive"]["2"]
    measured = QuEPTConfig.from_dict(cell["settings"]["config"])
    assert measured.spec == PRESET_SPECS["cpu-long"]
    assert measured.calib == PRESETS["cpu-long"]


def test_devices_are_checked_before_work():
    import torch

    from quept.checks import check_device
    from quept.cli import main

    assert check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="'gpu' is not a device name"):
        check_device("gpu", "--device")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"only {n} CUDA device"):
            check_device(f"cuda:{n}")
        return
    with pytest.raises(ConfigError, match="--device 'cuda:1': .*pass --device cpu"):
        check_device("cuda:1", "--device")
    assert main(["quantize", "--preset", "paper", "--out", "never-written"]) == 2
    assert main(["eval", "no-such-folder", "--device", "cuda"]) == 2


def test_json_fields_are_checked_by_kind():
    from quept.checks import check_json_fields, is_json_kind

    assert is_json_kind(3, float) and is_json_kind(3.5, float) and not is_json_kind(True, float)
    assert is_json_kind(3, int) and not is_json_kind(3.0, int) and not is_json_kind(False, int)
    assert is_json_kind("mixed", (int, str)) and not is_json_kind(None, (int, str))
    fields = {"bits": (int, str), "layers": dict}
    check_json_fields({"bits": 3, "layers": {}}, fields, "m.json", ConfigError,
                      optional={"head": dict})
    for d, says in (({"layers": {}}, "m.json is damaged: it holds no 'bits', which should be a "
                                     "JSON integer or string"),
                    ({"bits": True, "layers": {}}, "a JSON boolean as 'bits'"),
                    ({"bits": 3, "layers": {}, "head": []}, "a JSON array as 'head', which "
                                                           "should be a JSON object")):
        with pytest.raises(ConfigError, match=says):
            check_json_fields(d, fields, "m.json", ConfigError, optional={"head": dict})


def test_a_missing_optional_package_is_named_with_the_extra_that_installs_it(
        monkeypatch, tmp_path, capsys):
    import sys

    from quept.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert main(["quantize", "--out", str(tmp_path / "out")]) == 2
    assert ("this needs the transformers package, which is not installed: pip install "
            "'quept[hf]'") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
