"""The Ollama-compatible front under ``/api`` (and ``/``): a relay of Ollama's own bytes."""
