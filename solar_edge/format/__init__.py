"""Wire formats, board-safe: packet v1 (records, layout, reader, writer, signing) and bundles.

Bytes in, checked objects out, and back; no numeric codec work and no I/O beyond reading
the files a caller names. The usual entry points::

    from solar_edge.format import decode_packet, encode_packet, PacketHeader
"""

from solar_edge.format.packet import Packet, PacketHeader, PacketLimits
from solar_edge.format.reader import decode_packet
from solar_edge.format.writer import encode_packet

__all__ = ["Packet", "PacketHeader", "PacketLimits", "decode_packet", "encode_packet"]
