"""``python -m solar_edge.cli``: the same as the ``solar-edge`` command."""

from solar_edge.cli import main

main()
