"""Benchmarks that ship with cvgl: ``cvgl bench longmont|real-pairs|throughput|all``.

Each benchmark is a module with ``main(argv)`` that prints a Markdown section and, with ``--out``,
writes it atomically. ``cvgl bench all`` runs them in one process, one after the other (so their
timings do not compete), and assembles ``docs/benchmarks.md``.
"""
