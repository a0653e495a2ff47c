"""The single-model benchmarks' options (ViT, encoder) describe the spec and calibration they
say they do."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import vit  # noqa: E402
from peers.common import add_spec_args, quept_settings  # noqa: E402

from quept.config import PRESET_SPECS, PRESETS  # noqa: E402


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    vit.add_config_args(p, images=1024, epochs=8)
    return p.parse_args(list(argv))


def test_default_is_the_demo_spec_with_the_image_settings():
    spec, calib = vit.quept_config(parse())
    assert spec == PRESET_SPECS["cpu-demo"]
    assert (calib.n_samples, calib.batch_size, calib.epochs, calib.seed) == (1024, 32, 8, 0)
    assert calib.lr_adapter == PRESETS["cpu-demo"].lr_adapter


def test_preset_keeps_its_rates_and_its_groups():
    spec, calib = vit.quept_config(parse("--preset", "cpu-long", "--epochs", "16",
                                         "--group-size", "32"))
    assert spec.bit_groups == PRESET_SPECS["cpu-long"].bit_groups
    assert spec.ranks == PRESET_SPECS["cpu-long"].ranks
    assert spec.default_group_size == 32
    assert calib.lr_adapter_groups == PRESETS["cpu-long"].lr_adapter_groups
    assert calib.epochs == 16 and calib.n_samples == 1024


def test_other_groups_drop_the_preset_rates_and_take_equal_merge_weights():
    spec, calib = vit.quept_config(parse("--preset", "cpu-long", "--bit-groups", "8/6/4/2",
                                         "--ranks", "0,8,16,32"))
    assert spec.bit_groups == ((8,), (6,), (4,), (2,))
    assert spec.ranks == (0, 8, 16, 32)
    assert spec.merge_weights == (0.25,) * 4
    assert calib.lr_adapter_groups is None
    assert calib.lr_adapter == PRESETS["cpu-long"].lr_adapter
    assert spec.protect_outliers == PRESET_SPECS["cpu-long"].protect_outliers


def test_ranks_alone_replace_the_preset_ranks():
    spec, calib = vit.quept_config(parse("--preset", "cpu-long", "--ranks", "0,32,32,32,32"))
    assert spec.ranks == (0, 32, 32, 32, 32)
    assert calib.lr_adapter_groups == PRESETS["cpu-long"].lr_adapter_groups


def test_unset_calibration_fields_keep_the_preset_values():
    p = argparse.ArgumentParser()
    add_spec_args(p)
    spec, calib = quept_settings(p.parse_args(["--preset", "cpu-long", "--seed", "3"]),
                                 n_samples=32, seq_len=128, batch_size=None, epochs=8)
    assert (calib.n_samples, calib.seq_len, calib.epochs, calib.seed) == (32, 128, 8, 3)
    assert calib.batch_size == PRESETS["cpu-long"].batch_size
    assert calib.massive_ratio == PRESETS["cpu-long"].massive_ratio
    assert spec.default_group_size == 64


def test_labels_name_the_preset_groups_ranks_and_epochs():
    from peers.common import quept_label

    spec, calib = vit.quept_config(parse("--preset", "cpu-long", "--ranks", "0,32,32,32,32",
                                         "--epochs", "16"))
    assert quept_label(spec) == ("QuEPT (one model, all widths; groups 7,8/5,6/4/3/2, "
                                 "ranks 0,32,32,32,32)")
    assert quept_label(spec, "cpu-long", calib.epochs) == (
        "QuEPT (one model, all widths; cpu-long, groups 7,8/5,6/4/3/2, ranks 0,32,32,32,32, "
        "16 epochs)")


def test_tables_have_a_row_per_method_and_leave_the_float_row_out(capsys):
    from peers.single import print_tables

    rows = [{"method": "float", "bits": None, "kl": 0.0},
            {"method": "QuEPT", "bits": 2, "kl": 0.00224}, {"method": "QuEPT", "bits": 4, "kl": 0.5},
            {"method": "GPTQ", "bits": 2, "kl": 0.00306}, {"method": "GPTQ", "bits": 4, "kl": 0.25}]
    print_tables(rows, [2, 4], (("kl", "KL", "{:.5f}"),))
    lines = capsys.readouterr().out.splitlines()
    assert "| method | W2 | W4 |" in lines
    assert "| QuEPT | 0.00224 | 0.50000 |" in lines
    assert "| GPTQ | 0.00306 | 0.25000 |" in lines
    assert not any(line.startswith("| float") for line in lines)
