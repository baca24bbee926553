"""The router's HTTP API, beside gRPC (FastAPI on uvicorn, in a thread of the router's process).

    POST /v1/samples   {"count": 4, "strategy": "top2", "seed": 0, "steps": 0, "format": "json"}
                       -> JSON: per image a base64 PNG and the experts that made it, the live and
                          missing experts; or with "format": "png" one PNG grid (headers say the rest)
    GET  /v1/experts   the live experts: cluster, peer, address, images in the cluster, calls
    GET  /healthz      200 with "ok" or "degraded" (experts missing), 503 with no live expert
    GET  /openapi.json the OpenAPI document;  GET / the page that asks for samples (page.html)

Every sample request goes through the router's Sampler (sampling.py), the same bounds, token
bucket per client address and batching queue as gRPC Router.Sample. Errors are JSON
{"error": "..."}: 400 for a bound or strategy, 422 for a body that is not the schema, 429 over
the client's rate, 503 when no expert could serve.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.net.experts.sampling import Answer, Sampler, SampleRefused
from p2pd.addresses import bare_host, host_port

PAGE = Path(__file__).with_name("page.html")
STATUS = {"invalid": 400, "rate": 429, "busy": 503, "unavailable": 503}
MAX_BODY_BYTES = 16 * 1024  # a sample request is a few dozen bytes


class ApiError(BaseModel):
    """Every error the API answers: one line, and for a refused sample the reason (invalid, rate, busy,
    unavailable)."""

    error: str
    reason: str | None = None


ERRORS = {
    400: {"model": ApiError, "description": "a bound or the strategy"},
    413: {"model": ApiError, "description": f"a body over {MAX_BODY_BYTES} bytes"},
    422: {"model": ApiError, "description": "a body that is not the schema"},
    429: {"model": ApiError, "description": "over this client address's rate"},
    503: {"model": ApiError, "description": "busy, no live expert, or stopping"},
}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SampleBody(BaseModel):
    """The body of POST /v1/samples."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(16, ge=1, strict=True, description="images wanted (the router's experts.max_n at most)")
    strategy: str = Field(
        "top1", max_length=8, description="top1, top2, ... topK, or full (every expert at every step)"
    )
    seed: int = Field(0, ge=0, lt=2**64, strict=True, description="seed of the starting noise: same seed, same images")
    steps: int = Field(0, ge=0, strict=True, description="Euler steps; 0: the router's default (experts.sample_steps)")
    format: str = Field("json", pattern="^(json|png)$", description="json: base64 PNGs and experts; png: one grid")


def png(images: torch.Tensor, cols: int | None = None, gap: int = 2) -> bytes:
    """PNG bytes of `images` (N, C, H, W) in [0, 1] (C = 1 or 3) as a grid of `cols` columns (default: about
    square), `gap` pixels apart; one image when N = 1."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = cols or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, c), dtype=np.uint8) * 255
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = pixels[i]
    buf = io.BytesIO()
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def warning(answer: Answer) -> str | None:
    """One line saying which experts were missing from an answer, None when it is complete."""
    if answer.complete:
        return None
    fewest = min(answer.fewest, default=0)
    mix = (
        f"some steps mixed only {fewest}"
        if fewest < answer.per_image
        else f"every step still mixed {answer.per_image}, from fewer experts to choose from"
    )
    dropped = f"; dropped during the run: {', '.join(map(str, sorted(answer.failed)))}" if answer.failed else ""
    return (
        f"{len(answer.live)} of {answer.clusters} experts were live (missing: "
        f"{', '.join(map(str, answer.missing)) or 'none'}){dropped}; the strategy asks for {answer.per_image} per "
        f"image, {mix}"
    )


def build_app(
    sampler: Sampler,
    experts: Callable[[], list[dict]],
    observe: Callable[[str, str, float, Answer | None], None] | None = None,
) -> FastAPI:
    """The FastAPI app of a router: `sampler` serves POST /v1/samples; `experts()` lists the live experts as dicts
    (cluster, peer_id, address, images, calls, failures); `observe(route, status, seconds, answer)` is called once
    per request for metrics."""
    app = FastAPI(
        title="atoll router",
        version="1",
        description="Samples from an ensemble of decentralized diffusion experts (arXiv 2501.05450).",
        docs_url=None,  # the Swagger page loads scripts from a CDN: the API is /openapi.json
        redoc_url=None,
    )
    routes = {
        "/v1/samples": "http_samples",
        "/v1/experts": "http_experts",
        "/healthz": "http_healthz",
        "/": "http_page",
        "/openapi.json": "http_openapi",
    }

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.monotonic()
        size = request.headers.get("content-length", "0")
        if (
            not size.isdigit()
            or int(size) > MAX_BODY_BYTES
            or "chunked" in request.headers.get("transfer-encoding", "")
        ):
            return JSONResponse({"error": f"the body must be at most {MAX_BODY_BYTES} bytes, with a length"}, 413)
        response = await call_next(request)
        route = routes.get(request.url.path)
        if observe is not None and route is not None and route != "http_samples":  # samples observe themselves
            observe(route, str(response.status_code), time.monotonic() - t0, None)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if observe is not None and request.url.path == "/v1/samples":
            observe("http_samples", "422", 0.0, None)
        return JSONResponse({"error": _one_line(f"{where}: {first.get('msg', 'invalid')}")}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": _one_line(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.post(
        "/v1/samples",
        summary="Sample images from the experts' ensemble",
        responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or one PNG grid"}},
    )
    def samples(body: SampleBody, request: Request) -> Response:
        """Run the ensemble (blocking, in FastAPI's thread pool) and answer JSON or one PNG grid."""
        t0, status, answer = time.monotonic(), "500", None
        client = request.client.host if request.client else "unknown"
        try:
            try:
                answer = sampler.submit(body.count, body.strategy, body.steps, body.seed, client)
            except SampleRefused as e:
                status = str(STATUS[e.reason])
                return JSONResponse({"error": _one_line(e), "reason": e.reason}, status_code=STATUS[e.reason])
            response = _answer(body, answer)
            status = "200"
            return response
        finally:
            if observe is not None:
                observe("http_samples", status, time.monotonic() - t0, answer if status == "200" else None)

    def _answer(body: SampleBody, answer: Answer) -> Response:
        head = {
            "clusters": answer.clusters,
            "live": list(answer.live),
            "missing": answer.missing,
            "per_image": answer.per_image,
            "complete": answer.complete,
            "warning": warning(answer),
        }
        if body.format == "png":
            headers = {f"X-Atoll-{k.replace('_', '-').title()}": _header(v) for k, v in head.items() if v is not None}
            return Response(png(answer.images), media_type="image/png", headers=headers)
        images = [
            {"png": base64.b64encode(png(img[None])).decode(), "experts": s, "fewest": f}
            for img, s, f in zip(answer.images, answer.served, answer.fewest)
        ]
        return JSONResponse(
            {
                "count": len(images),
                "strategy": body.strategy,
                "seed": body.seed,
                "image_shape": list(answer.images.shape[1:]),
                **head,
                "failed": {str(j): why for j, why in sorted(answer.failed.items())},
                "images": images,
            }
        )

    @app.get("/v1/experts", summary="The live experts, their clusters and load")
    def live_experts() -> dict:
        """The clustering's K, the live experts and the clusters without one."""
        live = experts()
        return {
            "clusters": sampler.k,
            "live": live,
            "missing": sorted(set(range(sampler.k)) - {e["cluster"] for e in live}),
        }

    @app.get("/healthz", summary="Whether this router can answer", responses={503: {"description": "no live expert"}})
    def healthz() -> JSONResponse:
        """200 ok (every expert live) or degraded (some), 503 when no expert is live."""
        n = len({e["cluster"] for e in experts()})
        state = "ok" if n == sampler.k else "degraded" if n else "no_experts"
        return JSONResponse({"status": state, "live": n, "clusters": sampler.k}, status_code=200 if n else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        """The page that asks for samples and draws them (page.html)."""
        return HTMLResponse(PAGE.read_text())

    return app


def _header(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value).lower()


class HttpServer:
    """Serves `app` with uvicorn in a daemon thread on `host`:`port` (0: a free port), bound before it returns."""

    def __init__(self, app: FastAPI, host: str, port: int):
        """Binds the socket now. Raises OSError naming the address and the setting when it cannot."""
        import uvicorn

        bare = bare_host(host)
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((bare, port))
        except OSError as e:
            self._sock.close()
            raise OSError(
                f"cannot serve HTTP on {host_port(host, port)}: {e.strerror or e} "
                "(experts.http_port / --http-port; 0 picks a free port)"
            ) from None
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host_port(host, self.port)}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="atoll-http", daemon=True
        )
        self._thread.start()
        for _ in range(100):  # bounded: 10 s for uvicorn to start accepting
            if self._server.started or not self._thread.is_alive():
                break
            time.sleep(0.1)
        if not self._server.started:
            self.close()
            raise OSError(f"the HTTP server on {self.url} did not start (see the log above)")

    def close(self) -> None:
        """Stop serving, waiting up to 10 s for requests in progress."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
