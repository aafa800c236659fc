"""Link benchmark: ``python bench/linkbench.py --full-model M --lora L --packet P [--out DIR]``.

The work is the ``solar-edge linkbench`` command (solar_edge/devices/linkbench.py); this
script only forwards its arguments, so the table, JSON and PNG come from one code path.
"""

from __future__ import annotations

import sys

from solar_edge.devices.cli import linkbench

if __name__ == "__main__":
    linkbench.main(args=sys.argv[1:], prog_name="bench/linkbench.py")
