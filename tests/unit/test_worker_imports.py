"""What a worker imports before its ready handshake: most of a cold start is the worker's
interpreter start and imports, so cloudpickle (needed only for what plain pickle cannot do;
loading a function pickled by value imports it by itself) waits for its first use."""

from __future__ import annotations

import subprocess
import sys


def test_a_worker_starts_without_cloudpickle() -> None:
    code = (
        "import sys, orchestra_nb._worker\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cloudpickle', 'asyncio')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_results_still_pickle_by_value_once_cloudpickle_is_loaded() -> None:
    # A lambda pickled by value loads cloudpickle in the loading process; what the worker
    # then sends back of a cell-style (``__main__``) object goes through cloudpickle.
    code = (
        "import pickle, sys\n"
        "from orchestra_nb._serialize import dumps_result, dumps_with_source\n"
        "assert 'cloudpickle' not in sys.modules\n"
        "fn = pickle.loads(DATA)\n"
        "assert 'cloudpickle' in sys.modules and fn(2) == 3\n"
        "print(len(dumps_result(fn)) > 0)\n"
    )
    from orchestra_nb._serialize import dumps_with_source

    data = dumps_with_source(lambda x: x + 1)
    out = subprocess.run(
        [sys.executable, "-c", f"DATA = {data!r}\n" + code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
