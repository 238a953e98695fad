"""A notebook executed headless (nbclient, as ``jupyter execute`` and papermill do) and
saved keeps what the tasks printed and each job's final one-line summary, as ordinary
outputs of the cell that launched the job."""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

CELLS = [
    "import orchestra_nb\norchestra_nb.configure(workers=2)\n%load_ext orchestra_nb",
    textwrap.dedent("""\
        def measure(i):
            print(f"measuring sample {i}")
            if i == 4:
                raise ValueError("sample 4 is contaminated")
            return i * 1.5
        values = await orchestra.map(measure, range(8), return_exceptions=True)
        print("cell done")
        """),
    "quick = orchestra.map(abs, range(-3, 3))\nquick.result()",
]


def test_headless_run_saves_task_output_and_the_final_summary(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    path = tmp_path / "ran.ipynb"
    nbformat.write(nb, path)
    saved = nbformat.read(path, as_version=4)

    outputs = saved.cells[1].outputs
    stdout = "".join(o.get("text", "") for o in outputs
                     if o.output_type == "stream" and o.name == "stdout")
    for i in range(8):
        assert f"item {i}] measuring sample {i}\n" in stdout, stdout
    assert "cell done" in stdout
    texts = [o.data["text/plain"] for o in outputs if o.output_type == "display_data"]
    assert len(texts) == 1, outputs  # one widget, its text form the final state
    assert "measure: 7/8 done · 1 failed · finished with errors in" in texts[0], texts
    assert "\n" not in texts[0]

    quick = [o.data["text/plain"] for o in saved.cells[2].outputs
             if o.output_type == "display_data"]
    assert len(quick) == 1 and "abs: 6/6 done · done in" in quick[0], quick


# A background map whose tasks print only after their cell ended (they wait for a gate
# file that a later cell creates); one later cell awaits it, and the notebook's last cell
# blocks on a second one.
LATE_CELLS = [
    "import orchestra_nb\norchestra_nb.configure(workers=2)\n%load_ext orchestra_nb",
    textwrap.dedent("""\
        import os, time
        def talk(i, gate):
            while not os.path.exists(gate):
                time.sleep(0.005)
            print(f"late line {i}")
            return i
        h = orchestra.map(talk, range(6), [{gate!r}] * 6, chunksize=1)
        """),
    "open({gate!r}, 'w').close()\nr = await h\nprint('awaited', r)",
    "h2 = orchestra.map(talk, range(10, 14), [{gate2!r}] * 4, chunksize=1)",
    "open({gate2!r}, 'w').close()\nh2.result()",
]


def _outputs(cell: nbformat.NotebookNode) -> tuple[str, list[str]]:
    """(stream text, [text/plain of each display]) of a saved cell."""
    stream = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    texts = [o.data.get("text/plain", "") for o in cell.outputs if o.output_type == "display_data"]
    return stream, texts


def test_output_printed_after_the_launching_cell_ended_is_saved_in_that_cell(
    tmp_path: Path,
) -> None:
    gates = {"gate": str(tmp_path / "gate"), "gate2": str(tmp_path / "gate2")}
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src.replace("{gate!r}", repr(gates["gate"]))
                                          .replace("{gate2!r}", repr(gates["gate2"])))
                for src in LATE_CELLS]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    path = tmp_path / "late.ipynb"
    nbformat.write(nb, path)
    saved = nbformat.read(path, as_version=4)

    for launching, later, values, name in ((1, 2, range(6), "talk"), (3, 4, range(10, 14), "talk")):
        stream, texts = _outputs(saved.cells[launching])
        assert stream == "", stream  # nothing was printed while the cell ran
        assert len(texts) == 2, saved.cells[launching].outputs  # the widget, the later output
        summary, late = texts
        assert summary.startswith("[") and "\n" not in summary, summary
        assert f"{name}: {len(values)}/{len(values)} done · done in" in summary, summary
        for index, value in enumerate(values):
            assert f"item {index}] late line {value}\n" in late, late
        assert late.count("late line") == len(values), late
        later_stream, later_texts = _outputs(saved.cells[later])
        assert "late line" not in later_stream and later_texts == [], saved.cells[later].outputs
    assert "awaited [0, 1, 2, 3, 4, 5]" in _outputs(saved.cells[2])[0]
    results = [o for o in saved.cells[4].outputs if o.output_type == "execute_result"]
    assert results and results[0].data["text/plain"] == "[10, 11, 12, 13]"
