"""``/tensorlog/*`` on vLLM's API server: arm a capture, ask where it is, stop it, with no restart.

A ``vllm.endpoint_plugins`` entry point (vLLM loads it only when
``VLLM_PLUGINS`` names it; ``tensorlog vllm serve`` does). Each route checks
its caller, then sends one request to every worker with the engine client's
``collective_rpc``, the path vLLM's contract gives endpoint plugins; the
workers' side is :mod:`.control`.

Who may call: with ``--api-key`` (or ``VLLM_API_KEY``), every caller must
send one of the keys as ``Authorization: Bearer KEY``, loopback included;
vLLM's own check covers only ``/v1``. Without a key, only loopback callers
(and a Unix socket's) are served, and only when they name this machine
(``Host``) and come from no foreign web page (``Origin``): a page in a local
browser, or one that rebinds its DNS name to 127.0.0.1, is a loopback caller
too.
"""

import hashlib
import ipaddress
import itertools
import json
import os
import secrets
import socket
import time
from argparse import Namespace
from typing import Any

from ...config import LogConfig
from ...errors import ConfigError
from .control import capture_request
from .plugin import VLLM_OUTPUT_DIR, resolve_config

__all__ = ["TensorlogEndpoints", "RPC_TIMEOUT", "MAX_BODY"]

RPC_TIMEOUT = 300.0
"""Seconds a request waits for the workers: they answer between two steps, and ``stop`` waits for its run's
files (a late answer would be read by the next request instead)."""
MAX_BODY = 1 << 16


class _State:
    def __init__(self, engine: Any, tokens: list[bytes], base: "LogConfig | None") -> None:
        self.engine = engine
        self.tokens = tokens
        self.base = base
        self.count = itertools.count(1)


def _local_name(netloc: str) -> bool:
    """A ``Host`` or ``Origin`` host[:port] that names this machine: localhost, a loopback address, its hostname."""
    host = netloc.rsplit("@", 1)[-1]
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower().rstrip(".")
    return host in ("localhost", socket.gethostname().lower()) or host.endswith(".localhost") or _loopback(host)


def _foreign(request: Any) -> str | None:
    """Why a caller without a key is a web page rather than a local program, or None."""
    if not _local_name(request.headers.get("host", "")):
        return f"Host {request.headers.get('host', '')!r} does not name this machine"
    origin = request.headers.get("origin")
    if origin is not None:
        netloc = origin.split("://", 1)[-1].split("/", 1)[0]
        if origin == "null" or not _local_name(netloc):
            return f"a request from the web page {origin!r}"
    return None


def _loopback(host: str | None) -> bool:
    if host is None:  # a Unix socket: only this machine can reach it
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


class TensorlogEndpoints:
    """The endpoint plugin: routes under ``/tensorlog``."""

    name = "tensorlog"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter(prefix="/tensorlog")

        def refuse(request: Request) -> JSONResponse | None:
            st: _State | None = getattr(request.app.state, "tensorlog", None)
            if st is None or st.engine is None:
                return JSONResponse({"error": "tensorlog: this server has no engine"}, status_code=503)
            if st.tokens:
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                digest = hashlib.sha256(token.encode()).digest()
                if scheme.lower() != "bearer" or not any(secrets.compare_digest(digest, t) for t in st.tokens):
                    return JSONResponse(
                        {"error": "Unauthorized: /tensorlog needs the server's API key (Authorization: Bearer KEY)"},
                        status_code=401,
                    )
            elif not _loopback(request.client.host if request.client else None):
                return JSONResponse(
                    {"error": "Forbidden: without --api-key, /tensorlog serves loopback callers only"}, status_code=403
                )
            elif (why := _foreign(request)) is not None:
                return JSONResponse(
                    {"error": f"Forbidden: without --api-key, /tensorlog serves local programs only ({why})"},
                    status_code=403,
                )
            return None

        async def ask(request: Request, req: dict[str, Any]) -> JSONResponse:
            st: _State = request.app.state.tensorlog
            try:
                answers = await st.engine.collective_rpc("tensorlog_control", timeout=RPC_TIMEOUT, args=(req,))
            except Exception as e:
                return JSONResponse({"error": f"tensorlog: the workers did not answer: {type(e).__name__}: {e}"}, status_code=503)
            answers = [a for a in (answers or []) if isinstance(a, dict)]
            errors = [a for a in answers if a.get("error")]
            if errors:
                code = int(errors[0].get("status") or 409)
                return JSONResponse({"error": errors[0]["error"], "workers": answers}, status_code=code)
            if not answers:
                return JSONResponse({"error": "tensorlog: no worker answered"}, status_code=503)
            first = answers[0]
            return JSONResponse({**first, "workers": answers if len(answers) > 1 else None})

        @router.post("/capture")
        async def capture(request: Request) -> JSONResponse:
            if (no := refuse(request)) is not None:
                return no
            st: _State = request.app.state.tensorlog
            raw = await request.body()
            if len(raw) > MAX_BODY:
                return JSONResponse({"error": f"the body is larger than {MAX_BODY} bytes"}, status_code=413)
            try:
                body = json.loads(raw or b"{}")
                name = f"capture-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(st.count)}"
                req = capture_request(body, st.base, name, VLLM_OUTPUT_DIR)
            except (ValueError, RecursionError) as e:
                msg = str(e) if isinstance(e, ConfigError) else f"invalid JSON body: {e}"
                return JSONResponse({"error": msg}, status_code=400)
            return await ask(request, req)

        @router.get("/status")
        async def status(request: Request) -> JSONResponse:
            if (no := refuse(request)) is not None:
                return no
            return await ask(request, {"op": "status"})

        @router.post("/stop")
        async def stop(request: Request) -> JSONResponse:
            if (no := refuse(request)) is not None:
                return no
            return await ask(request, {"op": "stop"})

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
        try:
            base = resolve_config(getattr(args, "additional_config", None))
        except ConfigError:
            base = None  # the workers refuse it loudly at start-up
        state.tensorlog = _State(engine_client, [hashlib.sha256(k.encode()).digest() for k in keys], base)
