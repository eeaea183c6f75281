"""diskover_wire: the wire protocol the agent and the client share, on its own.

It imports neither the agent (``diskover_storage_agent``) nor the client
(``diskover_agent``), and needs no compiled module: see :mod:`.codec` for how
msgpack and JSON are encoded with or without msgspec.
"""

#: The version of this repository's distributions (all three share it).
__version__ = "0.1.0"
