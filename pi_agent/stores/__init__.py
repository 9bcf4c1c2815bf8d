"""Stores of conversation memory beside memory.py's in-process one: SQLite (``sqlite.py``)."""
