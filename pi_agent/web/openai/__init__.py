"""The OpenAI-compatible front under ``/v1``."""
