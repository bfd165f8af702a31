"""The wire and file contract between the edge-kit host and its device agents.

Standard library only, and it imports nothing else of edge-kit: the host (``edge_kit``) and the
agent (``device_agents``) both import it, and the agent bundle a deploy ships holds this package and
the agent, nothing of the host. What lives here:

- :mod:`~edgekit_protocol.messages`: topics, envelopes, encoding and decoding of every message;
- :mod:`~edgekit_protocol.commands`: every command the agent accepts, with its argument spec;
- :mod:`~edgekit_protocol.config`: the agent's config model (``agent.yaml``) and the broker settings;
- :mod:`~edgekit_protocol.datafile`: the ``.npz`` data-file format, read without numpy;
- :mod:`~edgekit_protocol.labels`: the one spelling of every label a record carries;
- :mod:`~edgekit_protocol.errors`: the root of edge-kit's one exception tree, and how a CLI leaves when standard
  output cannot be written;
- :mod:`~edgekit_protocol.files`: reading a file a config names without waiting on a FIFO there.
"""

__version__ = "0.1.0"  # the one version number of edge-kit (pyproject reads it from here)
