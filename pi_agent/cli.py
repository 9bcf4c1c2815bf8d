"""The command line: ``python -m pi_agent keys create|list|revoke`` and
``python -m pi_agent knowledge reindex [AGENT]``.

A running server reads the key file again within a second of a change: no restart.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import ConfigError, load_settings
from .core.agent_file import AgentsFileError, load_agents
from .core.knowledge import Library
from .security.keys import (
    ApiKey,
    KeyFileError,
    created_now,
    hash_key,
    locked,
    new_id,
    new_key,
    read_keys,
    write_keys,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pi_agent",
                                     description="Manage Pi Agent Server's API keys and "
                                     "knowledge indexes.")
    commands = parser.add_subparsers(dest="command", required=True)
    knowledge = commands.add_parser("knowledge", help="the agents' document indexes")
    knowledge_actions = knowledge.add_subparsers(dest="action", required=True)
    reindex = knowledge_actions.add_parser("reindex", help="index an agent's documents again")
    reindex.add_argument("agent", nargs="?", help="one agent (default: every agent with "
                         "knowledge)")
    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    keys.add_argument("--file", help="the key file (default: $PI_AGENT_KEYS_FILE)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; it is printed once, last")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--agents", help="agents it may use, comma-separated (default: all)")
    create.add_argument("--models", help="models it may use, comma-separated (default: all)")
    create.add_argument("--admin", action="store_true",
                        help="may list and delete every conversation and cancel every turn")
    create.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    create.add_argument("--tokens-per-day", type=int,
                        help="completion tokens per UTC day (default: no limit)")
    actions.add_parser("list", help="list the keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")
    args = parser.parse_args(argv)
    if args.command == "knowledge":
        return _reindex(args.agent)

    try:
        path = args.file or load_settings().keys_file
    except ConfigError as exc:
        return _fail(str(exc))
    if not path:
        return _fail("no key file: pass --file PATH or set PI_AGENT_KEYS_FILE")
    try:
        with locked(path):
            current = read_keys(path)
            if args.action == "create":
                return _create(path, current, args)
            if args.action == "list":
                return _list(path, current)
            return _revoke(path, current, args.id)
    except (KeyFileError, OSError) as exc:
        return _fail(str(exc))


def _create(path: str, current: list[ApiKey], args: argparse.Namespace) -> int:
    agents = _names(args.agents)
    try:
        known = list(load_agents(load_settings().agents_file))
    except (ConfigError, AgentsFileError) as exc:
        return _fail(str(exc))
    unknown = sorted(set(agents or ()) - set(known))
    if unknown:
        return _fail(f"unknown agent {', '.join(unknown)}: the agents are {', '.join(known)}")
    for flag, value in (("--rpm", args.rpm), ("--tokens-per-day", args.tokens_per_day)):
        if value is not None and value < 1:
            return _fail(f"{flag} must be 1 or more")
    secret = new_key()
    key = ApiKey(id=new_id(), name=args.name, hash=hash_key(secret), agents=agents,
                 models=_names(args.models), admin=args.admin, rpm=args.rpm,
                 tokens_per_day=args.tokens_per_day, created=created_now())
    write_keys(path, [*current, key])
    print(f"created {key.id} ({key.name}) in {path}: {_describe(key)}")
    print("The key is shown this once; keep it. The server holds only its hash.")
    print(secret)
    return 0


def _reindex(only: str | None) -> int:
    try:
        settings = load_settings()
        agents = load_agents(settings.agents_file)
    except (ConfigError, AgentsFileError) as exc:
        return _fail(str(exc))
    chosen = [agent for agent in agents.values()
              if agent.knowledge is not None and only in (None, agent.name)]
    if not chosen:
        return _fail(f"no agent {'called ' + only + ' ' if only else ''}has knowledge")
    library = Library(settings.state_dir)
    for agent in chosen:
        assert agent.knowledge is not None
        count = library.index(agent.name, agent.knowledge).reindex()
        print(f"{agent.name}: {count} passages from {', '.join(agent.knowledge.paths)}")
    return 0


def _list(path: str, current: list[ApiKey]) -> int:
    if not current:
        print(f"no keys in {path}")
    for key in current:
        print(f"{key.id}  {key.name}  created {key.created or '?'}: {_describe(key)}")
    return 0


def _revoke(path: str, current: list[ApiKey], key_id: str) -> int:
    kept = [key for key in current if key.id != key_id]
    if len(kept) == len(current):
        return _fail(f"no key has the id {key_id}: `keys list` shows them")
    write_keys(path, kept)
    print(f"revoked {key_id}; running servers stop accepting it within a second")
    return 0


def _describe(key: ApiKey) -> str:
    return ", ".join([
        f"agents {','.join(key.agents) if key.agents is not None else 'all'}",
        f"models {','.join(key.models) if key.models is not None else 'all'}",
        "admin" if key.admin else "not admin",
        f"{key.rpm} requests/min" if key.rpm else "no request limit",
        f"{key.tokens_per_day} tokens/day" if key.tokens_per_day else "no token limit",
    ])


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _fail(message: str) -> int:
    print(f"pi-agent: {message}", file=sys.stderr)
    return 1
