"""Secure by default: without API keys the server listens on loopback only.

Checked by gunicorn.conf.py in the master with the addresses gunicorn will really bind,
whether they come from PI_AGENT_BIND or from gunicorn's own ``-b``. Standard library only.
"""
from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from ..config import Settings
from .keys import read_keys


@functools.lru_cache(maxsize=1024)  # asked for each request's client in local mode
def is_loopback(address: str) -> bool:
    """Whether a gunicorn bind address (``host:port``, ``[v6]:port``, ``unix:path``) can be
    reached from this machine only."""
    if address.startswith("unix:"):
        return True
    host = address
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or fd://: it may be reachable from elsewhere


def refusal(addresses: Iterable[str], settings: Settings) -> str:
    """Why the server must not start on these addresses; "" if it may.

    :raise KeyFileError: the key file cannot be read.
    """
    if settings.auth == "off":
        return ""
    if settings.keys_file and read_keys(settings.keys_file):
        return ""
    public = [address for address in addresses if not is_loopback(address)]
    if not public:
        return ""
    return (f"refusing to listen on {', '.join(public)} without API keys: anybody on the "
            "network could use the models. Create a key with `python -m pi_agent keys create "
            "--name NAME` and set PI_AGENT_KEYS_FILE, or bind to 127.0.0.1, or set "
            "PI_AGENT_AUTH=off to serve everybody without keys")
