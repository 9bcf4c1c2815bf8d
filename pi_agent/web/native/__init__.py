"""The project's own API: ``/health``, ``/ready``, ``/agents``, ``/chat`` and its event
streams, ``/conversations``."""
