"""python -m lowbit: help, quantize and eval on the real stories260K model, errors."""
import json
import subprocess
import sys

import pytest

from lowbit import cli


def test_help_lists_subcommands_and_presets(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "quantize" in out and "eval" in out and "Examples" in out
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    for word in ("W4A16", "W8A16", "-asym", "stories260k", "smollm2", "minilm", "--max-windows"):
        assert word in out


def test_quantize_prints_report(tmp_path, capsys):
    js = tmp_path / "r.json"
    rc = cli.main(["quantize", "--model", "stories260k", "--scheme", "W4A16-g32", "--layers", "-q",
                   "--calibration-samples", "2", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model.layers.4.mlp.down_proj" in out and "35 layers" in out and "smaller" in out
    rep = json.loads(js.read_text())
    assert len(rep["layers"]) == 35 and all(r["output_sqnr_db"] > 10 for r in rep["layers"])


def test_eval_compares_with_baseline(tmp_path, capsys):
    js = tmp_path / "e.json"
    rc = cli.main(["eval", "--model", "stories260k", "--scheme", "W8A16", "W4A16-g32-asym", "--text",
                   "tinystories", "--max-windows", "4", "--decode-tokens", "4", "-q", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = json.loads(js.read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["fp", "W8A16-pc-sym", "W4A16-g32-asym"]
    base, w8, w4 = (r["value"] for r in rows)
    # Measured on the whole sample (tests/api/test_api_quantize.py): W8A16 within 0.1% of fp,
    # W4A16-g32-asym 10% above; these 4 windows are a quarter of it, hence the wide bounds.
    assert w8 / base < 1.005 and 1.02 < w4 / base < 1.2
    assert rows[2]["model_bytes"] < rows[1]["model_bytes"] < rows[0]["model_bytes"]
    assert "W4A16-g32-asym" in out and "decode tok/s" in out


@pytest.mark.parametrize("argv,match", [
    (["quantize", "--model", "stories260k", "--scheme", "W5A8"], "unknown preset 'W5A8'"),
    (["quantize", "--model", "stories260k", "--scheme", "W4A16"], "group_size 128 is larger than in_features 64"),
    (["quantize", "--model", "no_such_model_dir"], "unknown model 'no_such_model_dir'"),
    (["quantize", "--model", "stories260k", "--scheme", "W8A8", "--method", "awq"], "weight-only grids"),
    (["quantize", "--model", "stories260k", "--scheme", "W4A16-g32", "--method", "smoothquant"],
     "SmoothQuant migrates activation outliers"),
    (["quantize", "--model", "stories260k", "--scheme", "W8A8", "--alpha", "0.8"], "--alpha is a SmoothQuant option"),
    (["quantize", "--model", "stories260k", "--scheme", "W4A16-g32", "--method", "awq", "--calibration-samples", "0"],
     "--method awq needs calibration data"),
])
def test_errors_are_one_clear_line(argv, match, capsys):
    try:
        rc = cli.main(argv + ["-q"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
        err = str(e.code)
    else:
        err = capsys.readouterr().err
    assert rc == 2 and match in (err + capsys.readouterr().err)


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "python -m lowbit" in out.stdout


@pytest.mark.parametrize("argv", [
    ["--scheme", "W4A16-g32-asym", "--method", "awq"],
    ["--scheme", "W8A8-static", "--method", "smoothquant", "--alpha", "0.6"],
    ["--scheme", "FP8"],
    ["--scheme", "LLM.int8"],
])
def test_quantize_awq_and_w8a8(argv, capsys):
    assert cli.main(["quantize", "--model", "stories260k", "--calibration-samples", "2", "-q"] + argv) == 0
    assert "35 layers" in capsys.readouterr().out
