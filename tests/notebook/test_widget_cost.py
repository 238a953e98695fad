"""What showing a job's widget costs the cell, in a real kernel: the rows share their layout
and style models (made once, remade if someone closed them), and the widget is displayed
after what the cell printed before it (its display no longer waits for the kernel's output
thread, so the order must come from elsewhere)."""

from __future__ import annotations

import pytest
from kernel_harness import Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

_SHARED = ("LayoutModel", "HTMLStyleModel", "ButtonStyleModel")
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _refs(k: Kernel, widgets: dict[str, str]) -> set[str]:
    """The layout and style models the row's parts point to."""
    refs = set()
    for part in ("view", "button", "box"):
        state = k.state(widgets[part])
        refs.add(state["layout"])
        if "style" in state:
            refs.add(state["style"])
    return refs


def test_rows_share_their_layout_and_style_models(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute("def inc(x):\n    return x + 1")
    first, _ = k.execute("r = await orchestra.map(inc, range(5))")
    second, _ = k.execute("r = await orchestra.map(inc, range(5))")
    a, b = k.job_widgets(first), k.job_widgets(second)
    # The second job's row opened only its own three models, and points to the first's
    # layouts and styles.
    assert all(not k.comms(second, model) for model in _SHARED), [k.comms(second, m) for m in _SHARED]
    assert _refs(k, a) == _refs(k, b) and len(_refs(k, a)) == 5
    assert k.wait_view(b["view"], lambda n: n["state"] == "done")["text"].startswith("inc 5/5 done")

    # Someone closed every widget: the next row gets layouts and styles that are open.
    third, _ = k.execute(
        "import ipywidgets\nipywidgets.Widget.close_all()\nr = await orchestra.map(inc, range(5))"
    )
    c = k.job_widgets(third)
    fresh = {f"IPY_MODEL_{comm}" for model in _SHARED for comm in k.comms(third, model)}
    assert _refs(k, c) == fresh and len(fresh) == 5
    assert k.wait_view(c["view"], lambda n: n["state"] == "done")["text"].startswith("inc 5/5 done")


def test_the_widget_comes_after_what_the_cell_printed_before_it(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute("def inc(x):\n    return x + 1")
    for _ in range(3):  # (a wrong order shows in most runs, not all: three cells)
        mid, _ = k.execute(
            "import sys\nprint('before on stdout')\nprint('before on stderr', file=sys.stderr)\n"
            "r = await orchestra.map(inc, range(5))\nprint('after')"
        )
        kinds = []
        for m in k.for_cell(mid):
            if m["msg_type"] == "stream":
                kinds.append(m["content"]["text"])
            elif m["msg_type"] == "display_data" and _WIDGET_MIME in m["content"]["data"]:
                kinds.append("WIDGET")
                assert m["content"]["transient"]["display_id"]
        shown = kinds.index("WIDGET")
        assert kinds.count("WIDGET") == 1
        before = "".join(kinds[:shown])
        assert "before on stdout" in before and "before on stderr" in before, kinds
        assert "after" in "".join(kinds[shown + 1 :]), kinds
