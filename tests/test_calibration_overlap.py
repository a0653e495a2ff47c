"""quept quantize keeps a sample of its calibration text, and quept quantize and quept eval
warn when the evaluation text was (partly) calibrated on."""

import json

from quept.cli import main
from tests.export.tiny import hf_folder

WARNING = "of the evaluation text's paragraphs are also in the calibration text"


def text(tag: str, n: int = 120) -> str:
    return "\n\n".join(f"Paragraph {i} of the {tag}: it is a truth universally acknowledged, "
                       "that a single man must be in want of a wife." for i in range(n))


def run_json(capsys, argv):
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_evaluating_on_the_calibration_text_is_warned_of(tmp_path, capsys, caplog):
    base = hf_folder(tmp_path / "base")
    calib, held_out = tmp_path / "calib.txt", tmp_path / "held-out.txt"
    calib.write_text(text("novel"))
    held_out.write_text(text("other novel"))
    out = tmp_path / "el"
    quantize = ["quantize", "--model", str(base), "--calib-text", str(calib), "--samples", "2",
                "--seq-len", "32", "--epochs", "1", "--eval-windows", "1", "--eval-seq-len",
                "32", "--eval-bits", "4"]
    result = run_json(capsys, [*quantize, "--out", str(out), "--eval-text", str(calib)])
    assert result["calibration_overlap"] == 1.0
    assert f"100% {WARNING} (calib.txt)" in caplog.text
    record = json.loads((out / "quept.json").read_text())["calibration_text"]
    assert record["name"] == "calib.txt" and 0 < len(record["paragraph_sample"]) < 120
    assert main(["info", str(out)]) == 0
    assert "calibrated on 2 x 32 tokens of calib.txt, 1 epoch" in capsys.readouterr().out

    caplog.clear()  # quept eval reads the sample the folder keeps
    evaluate = ["eval", str(out), "--bits", "4", "--windows", "1", "--seq-len", "32"]
    assert run_json(capsys, [*evaluate, "--text", str(calib)])["calibration_overlap"] == 1.0
    assert f"100% {WARNING} (calib.txt)" in caplog.text
    caplog.clear()
    assert run_json(capsys, [*evaluate, "--text", str(held_out)])["calibration_overlap"] == 0
    assert WARNING not in caplog.text

    caplog.clear()
    result = run_json(capsys, [*quantize, "--out", str(tmp_path / "el2"), "--eval-text",
                               str(held_out)])
    assert "calibration_overlap" not in result and WARNING not in caplog.text


def test_exports_keep_the_sample_and_warn_alike(tmp_path, capsys, caplog):
    """A packed folder and a compact checkpoint record the sample of the calibration text they
    came from, and so do a packed folder exported from the compact checkpoint and the
    compressed-tensors and ONNX exports."""
    base = hf_folder(tmp_path / "base")
    calib = tmp_path / "calib.txt"
    calib.write_text(text("novel"))
    out = tmp_path / "el"
    run_json(capsys, ["quantize", "--model", str(base), "--calib-text", str(calib), "--samples",
                      "2", "--seq-len", "32", "--epochs", "1", "--eval-windows", "0", "--out",
                      str(out)])
    kept = json.loads((out / "quept.json").read_text())["calibration_text"]
    run_json(capsys, ["export", str(out), "--bits", "3", "--out", str(tmp_path / "w3")])
    run_json(capsys, ["compact", str(out), "--out", str(tmp_path / "c")])
    run_json(capsys, ["export", str(tmp_path / "c"), "--bits", "4", "--out", str(tmp_path / "w4")])
    for fmt in ("compressed-tensors", "onnx"):
        run_json(capsys, ["export", str(out), "--bits", "4", "--format", fmt, "--out",
                          str(tmp_path / fmt)])
    assert json.loads((tmp_path / "w3" / "quept-packed.json").read_text())["source"][
        "calibration_text"] == kept
    info = run_json(capsys, ["info", str(tmp_path / "w3")])
    assert info["source"]["calibration_text"] == "calib.txt"  # by name, without the sample
    assert main(["info", str(tmp_path / "w4")]) == 0
    assert "(calibrated on calib.txt)" in capsys.readouterr().out
    evaluate = ["--windows", "1", "--seq-len", "32", "--text", str(calib)]
    for folder, bits in (("w3", []), ("w4", []), ("c", ["--bits", "2"]),
                         ("compressed-tensors", []), ("onnx", [])):
        caplog.clear()
        result = run_json(capsys, ["eval", str(tmp_path / folder), *bits, *evaluate])
        assert result["calibration_overlap"] == 1.0, folder
        assert f"100% {WARNING} (calib.txt)" in caplog.text, folder
