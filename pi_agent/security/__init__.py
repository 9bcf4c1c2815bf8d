"""Who may do what: API keys (read by gunicorn's master too, so standard library only),
their limits, and where the server may listen."""
