"""The command line: argv, options, one module per command group, reports, plots.

``main`` (argv), shared ``options``, one module per command group (``run``,
``simulate``, ``data``, ``observe``, ``admin``, ``shapley``), and the ``reports`` and
``plots`` they print.
"""
