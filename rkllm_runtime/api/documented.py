"""Success answers in /openapi.json: a route names the declared shapes (TypedDicts) of its JSON body and
of its stream's events, which the document carries under components/schemas.

Only the document uses the shapes: routes return their bodies as built, and nothing validates or
re-serialises them on the way out (the shape tests do that, against real answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

_COMPONENT = "#/components/schemas/{model}"

Shapes = type | Sequence[type]  # one shape, or the shapes an answer is one of


class ShapeCatalog:
    """The shapes the routes named, and their JSON Schemas as OpenAPI components."""

    def __init__(self) -> None:
        self._shapes: dict[str, type] = {}

    def answer(
        self, body: Shapes | None = None, stream: Shapes | None = None, stream_media_type: str = ""
    ) -> dict[int | str, dict[str, Any]]:
        """A route's `responses=`: 200 with body as application/json, each stream event as
        stream_media_type."""
        content: dict[str, Any] = {}
        if body is not None:
            content["application/json"] = {"schema": self._schema(body)}
        if stream is not None:
            assert stream_media_type, "a stream's events need their media type"
            content[stream_media_type] = {"schema": self._schema(stream)}
        return {200: {"content": content}}

    def _schema(self, shapes: Shapes) -> dict[str, Any]:
        listed = [shapes] if isinstance(shapes, type) else list(shapes)
        for shape in listed:
            known = self._shapes.setdefault(shape.__name__, shape)
            assert known is shape, f"two response shapes are named {shape.__name__}"
        refs = [{"$ref": _COMPONENT.format(model=shape.__name__)} for shape in listed]
        return refs[0] if len(refs) == 1 else {"anyOf": refs}

    def components(self) -> dict[str, Any]:
        adapters: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = [
            (name, "serialization", TypeAdapter(shape)) for name, shape in self._shapes.items()
        ]
        _, schemas = TypeAdapter.json_schemas(adapters, ref_template=_COMPONENT)
        components: dict[str, Any] = schemas.get("$defs", {})
        missing = set(self._shapes) - set(components)
        assert not missing, f"shapes without a schema of their own name: {sorted(missing)}"
        return components


RESPONSE_SHAPES = ShapeCatalog()


class DocumentedApp(FastAPI):
    """FastAPI whose OpenAPI document also carries the response shapes its routes name."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document = super().openapi()
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                RESPONSE_SHAPES.components()
            )
        return super().openapi()
