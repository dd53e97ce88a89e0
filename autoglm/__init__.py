"""Open-AutoGLM: an event-streaming data loop for knowledge search.

The package holds what every part of the loop shares: settings, topic names, event
schemas, the encoder, metrics and the command line. The parts themselves live beside
it: ``streams/`` (stream processors), ``search/`` (index backends, query, HTTP API),
``consumers/``, ``feedback/`` and ``registry/``.
"""

__version__ = "0.1.0"
