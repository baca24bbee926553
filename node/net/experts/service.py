"""gRPC services of the diffusion roles (proto/router.proto): an expert's Predict, the
router's Sample (over the Sampler of sampling.py, which batches and limits requests for gRPC
and HTTP alike), and the client side of Predict that the router calls.

Matrices travel as raw little-endian float32 with their shape; `matrix_from_pb` checks rank,
sizes, byte length and finiteness before anything touches a model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import torch

from node.algo.experts import ensemble
from node.net.experts.sampling import Answer, Sampler, SampleRefused
from p2pd.admission import Admission, sign_predict
from p2pd.client import open_channel
from p2pd.identity import Identity
from p2pd.refusals import UNDECODABLE, Refusals, add_lenient_service
from p2pd.rpc import router_pb2 as pb
from p2pd.rpc import router_pb2_grpc as pb_grpc
from p2pd.server import TLSConfig

log = logging.getLogger(__name__)
MAX_ROWS = 4096  # per Predict call
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def client_host(peer: str) -> str:
    """The host of a gRPC peer string ("ipv4:127.0.0.1:5000" -> "127.0.0.1", "ipv6:[::1]:5000"
    -> "::1"): what a per-client rate limit is keyed by."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def matrix_to_pb(t: torch.Tensor) -> pb.Matrix:
    """A (rows, cols) tensor as a Matrix: its shape and raw little-endian float32 bytes (copied to CPU)."""
    a = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return pb.Matrix(shape=list(a.shape), data=a.tobytes())


def matrix_from_pb(m: pb.Matrix, cols: int, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """The (rows, cols) float32 tensor in `m`, or ValueError saying what is wrong with it."""
    if len(m.shape) != 2:
        raise ValueError(f"expected a matrix (rank 2), got rank {len(m.shape)}")
    rows, c = m.shape
    if c != cols:
        raise ValueError(f"expected {cols} columns, got {c}")
    if not 1 <= rows <= max_rows:
        raise ValueError(f"rows must be in [1, {max_rows}], got {rows}")
    if len(m.data) != rows * cols * 4:
        raise ValueError(f"{len(m.data)} bytes for a {rows}x{cols} float32 matrix")
    t = torch.from_numpy(np.frombuffer(m.data, dtype="<f4").astype(np.float32).reshape(rows, cols))
    if not torch.isfinite(t).all():
        raise ValueError("matrix holds NaN or Inf")
    return t


# -- expert -----------------------------------------------------------------------------------
class ExpertService(pb_grpc.ExpertServicer):
    """The Expert gRPC service of one cluster's denoiser: Predict answers its velocity for a batch of (x_t, t); `calls`
    counts the forwards."""

    def __init__(
        self,
        model: torch.nn.Module,
        cluster: int,
        cluster_digest: str,
        dim: int,
        device: torch.device,
        admission: Admission | None = None,
        observe: Callable[[str, float, int], None] | None = None,
    ):
        """`model`: the denoiser, flattened images (B, dim) and times (B,) to velocities (B, dim); `cluster`: its
        cluster id; `cluster_digest`: the clustering's digest callers must present; `dim`: values per image; `device`:
        where the model runs; `admission`: the node's p2pd Admission (signed by a live member, within its rate), None
        serves anyone (benchmarks and tests); `observe(status, seconds, rows)`: called once per call, for metrics."""
        self.observe = observe
        self.model, self.cluster, self.cluster_digest, self.dim, self.device = (
            model,
            cluster,
            cluster_digest,
            dim,
            device,
        )
        self.admission = admission
        self.calls = 0
        self._refusals = Refusals("a Predict request")
        self.refused = self._refusals.counts  # Predict requests refused, by reason (admission's, bad_request)
        self._lock = threading.Lock()  # one forward at a time: CPU threads are the bottleneck anyway

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictReply:
        """See `_predict`; times the call and reports it to `observe`."""
        t0, status, rows = time.monotonic(), "UNKNOWN", 0
        try:
            reply = self._predict(request, context)
            status, rows = "OK", reply.velocity.shape[0]
            return reply
        except Exception:
            status = _code_name(context)
            raise
        finally:
            if self.observe is not None:
                self.observe(status, time.monotonic() - t0, rows)

    def _predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictReply:
        """The velocity (rows, dim) float32 at the request's x (rows, dim) and t (rows,) in [0, 1]; aborts with
        FAILED_PRECONDITION for another clustering's digest, INVALID_ARGUMENT for a bad x or t, PERMISSION_DENIED or
        RESOURCE_EXHAUSTED (over its rate) when admission refuses the caller; undecodable bytes are INVALID_ARGUMENT
        (`bad_request`, counted, one log line a minute)."""
        self._refusals.refuse_undecodable(request, context)
        refusal = self.admission.check_predict(request) if self.admission is not None else None
        if refusal is not None:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if refusal == "rate" else grpc.StatusCode.PERMISSION_DENIED
            self._refusals.refuse(context, refusal, code, f"refused: {refusal}")
        if request.cluster_digest != self.cluster_digest:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this expert belongs to another clustering (cluster_digest differs)",
            )
        try:
            x = matrix_from_pb(request.x, self.dim)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"x: {e}")
        t = torch.tensor(list(request.t), dtype=torch.float32)
        if len(t) != len(x) or not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "t needs one value in [0, 1] per row of x")
        with self._lock, torch.no_grad():
            v = self.model(x.to(self.device), t.to(self.device)).cpu()
            self.calls += 1
        return pb.PredictReply(velocity=matrix_to_pb(v), cluster=self.cluster)


class RemoteExpert:
    """A live expert's Predict as a velocity callable; any failure raises ExpertUnavailable."""

    def __init__(
        self,
        address: str,
        cluster: int,
        cluster_digest: str,
        dim: int,
        timeout: float = 10.0,
        *,
        peer_id: str = "",
        identity: Identity | None = None,
        tls: TLSConfig | None = None,
    ):
        """`peer_id`: the expert's; `identity`: signs every request to it (None: unsigned,
        which only an expert without admission serves); `tls`: as the swarm's net.tls_*."""
        self.address, self.cluster, self.cluster_digest, self.dim, self.timeout = (
            address,
            cluster,
            cluster_digest,
            dim,
            timeout,
        )
        self.peer_id, self.identity = peer_id, identity
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
        ]
        self._channel = open_channel(address, options, tls)
        self._stub = pb_grpc.ExpertStub(self._channel)
        self.calls = 0  # Predict calls made (the expert's load from this router)
        self.failures = 0  # of them, the ones that failed

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The remote expert's velocity (B, dim) float32 at x_t (B, dim) and t (B,), in as many Predict calls as keep
        each message under half the message limit; raises ExpertUnavailable on an RPC error, a malformed reply or an
        answer from another cluster."""
        rows = max(1, min(MAX_ROWS, MAX_MESSAGE_BYTES // 2 // (4 * self.dim)))
        return torch.cat([self._predict(x[i : i + rows], t[i : i + rows]) for i in range(0, len(x), rows)])

    def _predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        req = pb.PredictRequest(x=matrix_to_pb(x), t=t.tolist(), cluster_digest=self.cluster_digest)
        if self.identity is not None:
            sign_predict(self.identity, self.peer_id, req, time.time())
        self.calls += 1
        try:
            reply = self._stub.Predict(req, timeout=self.timeout)
            if reply.cluster != self.cluster:
                self.failures += 1
                raise ensemble.ExpertUnavailable(f"{self.address} answered as cluster {reply.cluster}")
            v = matrix_from_pb(reply.velocity, self.dim)
            if len(v) != len(x):
                raise ValueError(f"{len(v)} rows for {len(x)}")
            return v
        except grpc.RpcError as e:
            self.failures += 1
            raise ensemble.ExpertUnavailable(f"{self.address}: {e.code().name}") from None
        except ValueError as e:
            self.failures += 1
            raise ensemble.ExpertUnavailable(f"{self.address}: bad reply: {e}") from None

    def close(self) -> None:
        """Close the gRPC channel."""
        self._channel.close()


# -- router -----------------------------------------------------------------------------------
class RouterService(pb_grpc.RouterServicer):
    """Router.Sample over gRPC: a request goes to the router's Sampler (sampling.py), which the HTTP API shares."""

    def __init__(self, sampler: Sampler, observe: Callable[[str, str, float, Answer | None], None] | None = None):
        """`sampler`: the router's Sampler (bounds, rate limits, batching); `observe(route, status, seconds, answer)`:
        called once per request for metrics (route `grpc_sample`, status the gRPC code's name)."""
        self.sampler, self.observe = sampler, observe
        self._refusals = Refusals("a Sample request")
        self.refused = self._refusals.counts  # Sample requests refused, by reason (rate, busy, bad_request)

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> pb.SampleReply:
        """Generate `n` images in [0, 1] with the ensemble (strategy top1 .. topK or full, `steps` Euler steps, noise
        from `seed`), batched with concurrent requests of the same strategy and steps. Aborts with INVALID_ARGUMENT
        for undecodable bytes and bad parameters (n times steps over the router's bound included),
        RESOURCE_EXHAUSTED over the client's rate, UNAVAILABLE when no expert could serve."""
        t0, status, answer = time.monotonic(), "OK", None
        try:
            self._refusals.refuse_undecodable(request, context)
            try:
                answer = self.sampler.submit(
                    request.n,
                    request.strategy,
                    request.steps,
                    request.seed,
                    client_host(context.peer()),
                    context.is_active,
                )
            except SampleRefused as e:
                code = _CODES[e.reason]
                status = code.name
                if e.reason in ("rate", "busy"):  # counted (atoll_requests_refused_total), logged once a minute
                    self._refusals.refuse(context, e.reason, code, str(e))
                context.abort(code, str(e))
            if answer is None:
                status = "CANCELLED"
                return pb.SampleReply()  # the client gave up; the run finished for the others
            return pb.SampleReply(
                images=matrix_to_pb(answer.images.reshape(len(answer.images), -1)),
                image_shape=list(answer.images.shape[1:]),
                served=[pb.ServedBy(clusters=s, fewest=f) for s, f in zip(answer.served, answer.fewest)],
                failed=[f"{j}: {why}" for j, why in sorted(answer.failed.items())],
                clusters=answer.clusters,
                live=list(answer.live),
                per_image=answer.per_image,
            )
        except Exception:
            if status == "OK":  # an abort below (undecodable bytes), or something unexpected
                status = "INVALID_ARGUMENT" if request is UNDECODABLE else _code_name(context)
            raise
        finally:
            if self.observe is not None:
                self.observe("grpc_sample", status, time.monotonic() - t0, answer)


def _code_name(context) -> str:
    """The status an aborted call ended with (UNKNOWN for an exception that was not an abort)."""
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "rate": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def register_expert(servicer: ExpertService, server: grpc.Server) -> None:
    """Serve `servicer` as atoll.v1.Expert on `server`, undecodable requests refused as `bad_request`."""
    add_lenient_service(server, "atoll.v1.Expert", {"Predict": (servicer.Predict, pb.PredictRequest, pb.PredictReply)})


def register_router(servicer: RouterService, server: grpc.Server) -> None:
    """Serve `servicer` as atoll.v1.Router on `server`, undecodable requests refused as `bad_request`."""
    add_lenient_service(server, "atoll.v1.Router", {"Sample": (servicer.Sample, pb.SampleRequest, pb.SampleReply)})
