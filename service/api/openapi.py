"""The OpenAPI document, with the nulls in its response examples kept.

FastAPI renders the document with `exclude_none=True` (fastapi/fastapi#5559), which also drops
every null inside an example: a study's `{"detail": null, ...}` is shown as `{...}`, an example
its own schema refuses (`detail` is required, and always sent). `keep_null_examples` puts the
examples back as they are written: the response models' `json_schema_extra` examples (the
`components`) and the examples of the routes' own `responses`. Request examples (`openapi_examples`
of bodies and parameters) hold no nulls; tests/test_api.py checks every example against its schema.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


def keep_null_examples(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json, /docs) show examples with their nulls."""
    restored: list[int] = []  # the id of the document already restored (FastAPI caches it)

    def openapi() -> dict[str, Any]:
        document = FastAPI.openapi(app)
        if restored != [id(document)]:
            _restore(document, app)
            restored[:] = [id(document)]
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _routes(app: FastAPI) -> list[Any]:
    try:
        from fastapi.routing import iter_route_contexts  # newer FastAPI keeps included routers nested
    except ImportError:  # older ones copy their routes into app.routes
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def _restore(document: dict[str, Any], app: FastAPI) -> None:
    components = document.get("components", {}).get("schemas", {})
    for route in _routes(app):
        if not getattr(route, "include_in_schema", False) or getattr(route, "dependant", None) is None:
            continue
        models = [route.response_model]
        for method in route.methods or ():
            operation = document["paths"][route.path_format][method.lower()]
            for status, response in (route.responses or {}).items():
                models.append(response.get("model"))
                for media, content in response.get("content", {}).items():
                    rendered = operation["responses"][str(status)]["content"][media]
                    rendered.update({key: content[key] for key in ("example", "examples") if key in content})
        for model in _models(models):
            extra = model.model_config.get("json_schema_extra")
            if not isinstance(extra, dict) or "examples" not in extra:
                continue
            for name in (model.__name__, f"{model.__name__}-Output"):
                if "examples" in components.get(name, {}):
                    components[name]["examples"] = extra["examples"]


def _models(annotations: list[Any], seen: set[type] | None = None) -> Iterator[type[BaseModel]]:
    """The pydantic models in these annotations and, recursively, in their fields."""
    seen = set() if seen is None else seen
    for annotation in annotations:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.add(annotation)
                yield annotation
                yield from _models([field.annotation for field in annotation.model_fields.values()], seen)
        else:
            yield from _models(list(typing.get_args(annotation)), seen)
