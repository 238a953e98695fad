"""A cached map's live view in a real kernel: one view for all its items, the items the
result store served counted as "cached N" with a bar segment of their own, in the widget
and in its saved text form."""

from __future__ import annotations

from pathlib import Path

import pytest
from kernel_harness import Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]


def _final_text(k: Kernel, mid: str) -> str:
    """The saved text form of cell ``mid``'s widget once its job ended."""
    [shown] = [m for m in k.for_cell(mid) if m["msg_type"] == "display_data"]
    display_id = shown["content"]["transient"]["display_id"]
    update = k.wait_for(  # (shown already final when the job was over before it was shown)
        lambda m: (
            m["msg_type"] in ("display_data", "update_display_data")
            and m["content"]["transient"]["display_id"] == display_id
            and "done in" in m["content"]["data"]["text/plain"]
        )
    )
    text: str = update["content"]["data"]["text/plain"]
    return text


def test_items_from_the_store_are_a_segment_and_a_count_of_their_own(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    k.execute(f"%config Orchestra.store = {str(tmp_path / 'store.sqlite')!r}")
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute("def sq(x):\n    return x * x")

    # Nothing stored yet: every item computed, no "cached" anywhere.
    mid, _ = k.execute("first = await orchestra.map(sq, range(6), cache=True)")
    w = k.job_widgets(mid)
    view = k.wait_view(w["view"], lambda n: n["state"] == "done")
    assert view["cached"] == 0 and "6/6 done · done in" in view["text"], view
    assert "cached" not in _final_text(k, mid)

    # Six of ten from the store: one view for the whole map.
    mid, _ = k.execute("h = orchestra.map(sq, range(10), cache=True)\nsecond = await h")
    assert k.value("second") == [x * x for x in range(10)] and k.value("h.cached") == 6
    assert len(k.comms(mid, "HTMLModel")) == 1 and len(k.comms(mid, "ButtonModel")) == 1
    w = k.job_widgets(mid)
    view = k.wait_view(w["view"], lambda n: n["state"] == "done")
    assert (view["succeeded"], view["cached"], view["total"]) == (10, 6, 10), view
    assert "10/10 done · 6 cached · done in" in view["text"], view
    value = k.state(w["view"])["value"]
    assert 'class="orchestra-cached" title="6 cached"' in value, value
    assert 'class="orchestra-succeeded" title="4 computed"' in value, value
    text = _final_text(k, mid)
    assert "\n" not in text and "sq: 10/10 done · 6 cached · done in" in text, text
    bar = text[: text.index("]") + 1]
    assert bar.startswith("[=") and "#" in bar and "-" not in bar, bar  # cached, then computed

    # All from the store: no worker ran, no rate to show; shown again later, the same line.
    mid, _ = k.execute("h3 = orchestra.map(sq, range(10), cache=True)\nthird = await h3")
    w = k.job_widgets(mid)
    view = k.wait_view(w["view"], lambda n: n["state"] == "done")
    assert view["cached"] == 10 and "10/10 done · 10 cached · done in" in view["text"], view
    text = _final_text(k, mid)
    assert text.startswith("[" + "=" * 24 + "]") and "/s" not in text, text
    mid, _ = k.execute("h3")
    assert not k.comms(mid) and "sq: 10/10 done · 10 cached · done in" in k.stream(mid)
