"""The notebook layer of orchestra_nb, loaded by ``%load_ext orchestra_nb``.

* ``_extension``: load/unload (magics, ``orchestra`` in the namespace, pool warm-up,
  clean shutdown);
* ``_config``: the ``Orchestra`` traitlets class (``%config Orchestra.workers = 4``);
* ``_progress``: one live progress widget per job, driven from a thread at <= 10 Hz, with a
  plain-text fallback where widgets cannot render; the live ``%orchestra status`` view;
* ``_output``: what tasks print, shown under the cell that launched them;
* ``_magics``: ``%%orchestra`` (foreground, ``--all``, ``--bg NAME``) and ``%orchestra``;
* ``_interrupt``: a second "interrupt kernel" within 2 s hard-kills the busy workers;
* ``_composite``: the composite block (steps, states, counts, Pause/Cancel) for a
  ``Sequence``/``Parallel``... handle: ``show_composite(handle)``, ``run_composite(step)``;
* ``_remote``: the worker side of ``%%orchestra`` (no IPython import: workers load it).

Importing this package imports nothing from IPython or ipywidgets.
"""
