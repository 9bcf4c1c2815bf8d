"""The version of Pi Agent Server, in a module of its own: /health reports it without
importing the package's app factory."""
__version__ = "0.1.0"
