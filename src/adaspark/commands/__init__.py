"""Subcommands of the ``adaspark`` command line: one module each (``add_parser`` and ``run``)."""
