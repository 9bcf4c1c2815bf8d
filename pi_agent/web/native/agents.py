"""The ``/agents`` routes: the agents a key may use, and one agent's preset."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ...core.agents import Agent
from ...errors import AgentNotFound
from ...state import current_state
from ..auth import allow_agent, current_key, may_use_agent
from .schemas import AgentInfo, AgentList

bp = Blueprint("agents", __name__)


def find_agent(name: str) -> Agent:
    """Return the preset called ``name``.

    :raise AgentNotFound: 404 if there is none.
    """
    agent = current_state().agents.get(name)
    if agent is None:
        raise AgentNotFound(name)
    return agent


@bp.get("/agents")
def list_agents() -> Response:
    """The agents that the request's key may use."""
    key = current_key()
    names = [name for name in current_state().agents if may_use_agent(key, name)]
    return jsonify(AgentList(agents=names).model_dump())


@bp.get("/agents/<name>")
def show_agent(name: str) -> Response:
    agent = find_agent(name)
    allow_agent(agent.name)
    settings = current_state().settings
    info = AgentInfo(
        name=agent.name,
        description=agent.description,
        kind=agent.kind,
        model=agent.resolve_model(settings),
        options=agent.resolve_options(settings),
        tools=[tool.name for tool in agent.tools],
        knowledge=list(agent.knowledge.paths) if agent.knowledge else None,
    )
    return jsonify(info.model_dump())
