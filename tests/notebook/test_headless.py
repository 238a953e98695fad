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
