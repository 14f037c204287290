"""``/openapi.json``, generated from the request and response models.

The route table below names, for each operation, its models; the schemas themselves
come from pydantic, so the document cannot drift from what handlers validate.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ballast.sessions import models as m

_ID = {"name": "session_id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": m.SESSION_ID_PATTERN}}

# (method, path, operationId, request model, {status: response model or None}, params)
_OPERATIONS: list[tuple[str, str, str, type[BaseModel] | None, dict[int, type[BaseModel] | None],
                        list[dict[str, Any]]]] = [
    ("post", "/v1/sessions", "createSession", m.CreateSession, {201: m.Session, 409: None}, []),
    ("get", "/v1/sessions", "listSessions", None, {200: m.SessionPage},
     [{"name": "after", "in": "query", "required": False,
       "schema": {"type": "string", "pattern": m.SESSION_ID_PATTERN}},
      {"name": "limit", "in": "query", "required": False,
       "schema": {"type": "integer", "minimum": 1, "maximum": m.SESSION_PAGE_MAX,
                  "default": m.SESSION_PAGE_DEFAULT}}]),
    ("get", "/v1/sessions/{session_id}", "getSession", None, {200: m.Session}, [_ID]),
    ("post", "/v1/sessions/{session_id}/mutations", "appendMutations", m.MutationBatch,
     {200: m.MutationsAccepted, 409: None}, [_ID]),
    ("get", "/v1/sessions/{session_id}/mutations", "listMutations", None, {200: m.MutationPage},
     [_ID,
      {"name": "after", "in": "query", "required": False,
       "schema": {"type": "integer", "minimum": 0, "maximum": 2**53}},
      {"name": "limit", "in": "query", "required": False,
       "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}]),
    ("post", "/v1/sessions/{session_id}/resolve", "resolveSpeakers", None,
     {200: m.ResolveResult, 409: None, 502: None, 503: None}, [_ID]),
    ("post", "/v1/sessions/{session_id}/finalize", "startFinalize", None,
     {202: m.FinalizeJobEnvelope, 409: None}, [_ID]),
    ("get", "/v1/sessions/{session_id}/finalize", "getFinalize", None, {200: m.FinalizeJobEnvelope},
     [_ID, {"name": "wait", "in": "query", "required": False,
            "description": "Seconds to wait for a running job to end before answering.",
            "schema": {"type": "number", "minimum": 0, "maximum": m.MAX_WAIT_S}}]),
    ("get", "/v1/sessions/{session_id}/report", "getReport", None, {200: m.Report}, [_ID]),
]


def _problem_ref() -> dict[str, Any]:
    return {"description": "Problem", "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Problem"}}}}


@cache
def openapi_document() -> bytes:
    models: set[type[BaseModel]] = {m.Problem}
    for _, _, _, req, responses, _ in _OPERATIONS:
        if req is not None:
            models.add(req)
        models.update(r for r in responses.values() if r is not None)
    ordered = sorted(models, key=lambda c: c.__name__)
    keys = [(c, "validation" if c in (m.CreateSession, m.MutationBatch) else "serialization")
            for c in ordered]
    _, schema = models_json_schema(keys, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    components = schema.get("$defs", {})
    paths: dict[str, Any] = {}
    for method, path, op_id, req, responses, params in _OPERATIONS:
        op: dict[str, Any] = {"operationId": op_id, "parameters": params, "responses": {}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{req.__name__}"}}}}
        for status, model in responses.items():
            if model is None:
                op["responses"][str(status)] = _problem_ref()
            else:
                op["responses"][str(status)] = {"description": "OK", "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        for code in ("400", "404", "413", "415", "422"):
            if code != "404" or params:
                op["responses"].setdefault(code, _problem_ref())
        op["responses"].setdefault("503", _problem_ref())
        paths.setdefault(path, {})[method] = op
    for simple in ("/healthz", "/readyz"):
        paths[simple] = {"get": {"operationId": simple.strip("/"), "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
            "503": _problem_ref()}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Ballast session API", "version": "1.0.0"},
        "paths": paths,
        "components": {"schemas": components},
    }
    return orjson.dumps(doc)


async def openapi_handler(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")
