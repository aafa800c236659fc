"""solar-edge: fine-tuned adapters for edge boards as signed coefficient-only packets.

Import root for the whole distribution. The shared core lives here (PRNG, basis
regeneration, codec, packet format, CLI); ``solar_edge.exporters``,
``solar_edge.runtime`` and ``solar_edge.devices`` are installed from the top-level
folders of the same names.
"""

__version__ = "0.1.0"
