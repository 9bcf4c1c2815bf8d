"""Turn a request body into a pydantic model, or into a 400 or 422 in the error shape."""
from __future__ import annotations

import json
from typing import TypeVar

from flask import request
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import InvalidRequest, ValidationFailed
from .schemas import FieldProblem

ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_body(model: type[ModelT]) -> ModelT:
    """Read the JSON body of the current request as ``model``.

    :raise InvalidRequest: 400 for a body that is not JSON or not sent as JSON.
    :raise ValidationFailed: 422 naming each failing field, without echoing the input.
    :raise RequestEntityTooLarge: 413 for a body over the configured size.
    """
    if not request.is_json:
        raise InvalidRequest()
    raw = request.get_data(cache=False)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON and bytes that are not UTF-8; RecursionError, deep nesting.
        raise InvalidRequest("the request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(
            [_describe(error) for error in exc.errors(include_url=False)]
        ) from None


def _describe(error: ErrorDetails) -> FieldProblem:
    field = ".".join(str(part) for part in error["loc"]) or "body"
    return FieldProblem(field=field, problem=str(error["msg"]).removeprefix("Value error, "))
