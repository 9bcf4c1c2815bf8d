"""The built-in tools: the time, arithmetic, and the Pi's own health. Each is a plain
function whose signature and docstring tools.py turns into what the model sees."""
from __future__ import annotations

import ast
import operator
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from typing import Any

# Bounds on what the calculator takes and makes: a model may send anything.
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**100

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def time_now() -> str:
    """The current local date and time, in ISO 8601 with the time zone."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def calculator(expression: str) -> str:
    """Work out an arithmetic expression: numbers, + - * / // % ** and parentheses."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    """An AST walk over numbers and arithmetic only: never ``eval``."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponents are at most {MAX_EXPONENT}")
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
    raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")


def _bounded(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError("the result is too large")
    return value  # type: ignore[no-any-return]


def pi_stats() -> dict[str, Any]:
    """This computer's health: CPU temperature, load, memory, disk and uptime. What the
    machine does not tell is reported as unknown."""
    return {
        "cpu_temperature_c": _read(_cpu_temperature),
        "load_1_5_15": _read(lambda: [round(x, 2) for x in os.getloadavg()]),
        "memory_mib": _read(_memory),
        "disk_mib": _read(_disk),
        "uptime_s": _read(lambda: round(float(_text("/proc/uptime").split()[0]))),
    }


def _read(probe: Callable[[], Any]) -> Any:
    try:
        return probe()
    except (OSError, ValueError, IndexError, KeyError):
        return "unknown"


def _text(path: str) -> str:
    with open(path, encoding="ascii") as file:
        return file.read()


def _cpu_temperature() -> float:
    return round(int(_text("/sys/class/thermal/thermal_zone0/temp").strip()) / 1000, 1)


def _memory() -> dict[str, int]:
    fields = {}
    for line in _text("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) // 1024  # kB to MiB
    return {"total": fields["MemTotal"], "available": fields["MemAvailable"]}


def _disk() -> dict[str, int]:
    usage = shutil.disk_usage("/")
    return {"total": usage.total >> 20, "free": usage.free >> 20}


FUNCTIONS = (time_now, calculator, pi_stats)
