"""notebooks/quantize_hf_model.ipynb, executed end to end (nbclient, the .venv's python3
kernel) on stories260K with small data slices, as CI runs it."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (scripts/setup.sh --test)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (scripts/setup.sh --test)")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (scripts/setup.sh --test)")
pytest.importorskip("matplotlib", reason="the notebook test needs matplotlib (scripts/setup.sh --test)")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quantize_hf_model.ipynb"
MARKER = "RELOAD CHECK PASSED"


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif o.get("output_type") in ("execute_result", "display_data"):
            out.append(o.get("data", {}).get("text/plain", ""))
        elif o.get("output_type") == "error":
            out.append(f"{o.get('ename')}: {o.get('evalue')}")
    return "".join(out)


def test_notebook_is_clean():
    """Committed without outputs or execution counts (CI produces them)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_notebook_runs_on_stories260k(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_NOTEBOOK_MODEL", "stories260k")
    monkeypatch.setenv("LOWBIT_NOTEBOOK_WINDOWS", "8")
    monkeypatch.setenv("LOWBIT_NOTEBOOK_CALIB", "4")
    monkeypatch.setenv("LOWBIT_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, startup_timeout=60,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"the notebook failed:\n{e}")
    seconds = time.perf_counter() - start
    print(f"notebook executed in {seconds:.1f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not any(o.get("output_type") == "error" for o in c.outputs) for c in code)
    assert MARKER in _text(code[-1]), _text(code[-1])
    # The plot was drawn (an image in the per-layer error cell) and the table printed.
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    table = next(_text(c) for c in code if "mean W SQNR dB" in _text(c))
    assert all(m in table for m in ("fp32", "rtn", "gptq", "awq"))
    assert any(p.name == "config.json" for p in tmp_path.rglob("config.json"))
    assert seconds < 180
