"""gRPC services of the diffusion roles (proto/router.proto): an expert's Predict, the
router's Sample, and the client side of Predict that the router calls.

Matrices travel as raw little-endian float32 with their shape; `matrix_from_pb` checks rank,
sizes, byte length and finiteness before anything touches a model. The router batches
concurrent Sample requests that ask for the same (strategy, steps) into one ensemble run, so
every expert sees one Predict per step for all of them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from node.algo.experts import ensemble
from node.algo.experts.flow import Velocity
from p2pd.admission import Admission, TokenBuckets, sign_predict
from p2pd.client import open_channel
from p2pd.identity import Identity
from p2pd.refusals import Refusals, add_lenient_service
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
    ):
        """`admission`: the node's p2pd Admission (signed by a live member, within its rate);
        None serves anyone (benchmarks and tests)."""
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

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The remote expert's velocity (B, dim) float32 at x_t (B, dim) and t (B,); raises ExpertUnavailable on an RPC
        error, a malformed reply or an answer from another cluster."""
        req = pb.PredictRequest(x=matrix_to_pb(x), t=t.tolist(), cluster_digest=self.cluster_digest)
        if self.identity is not None:
            sign_predict(self.identity, self.peer_id, req, time.time())
        try:
            reply = self._stub.Predict(req, timeout=self.timeout)
            if reply.cluster != self.cluster:
                raise ensemble.ExpertUnavailable(f"{self.address} answered as cluster {reply.cluster}")
            return matrix_from_pb(reply.velocity, self.dim)
        except grpc.RpcError as e:
            raise ensemble.ExpertUnavailable(f"{self.address}: {e.code().name}") from None
        except ValueError as e:
            raise ensemble.ExpertUnavailable(f"{self.address}: bad reply: {e}") from None

    def close(self) -> None:
        """Close the gRPC channel."""
        self._channel.close()


# -- router -----------------------------------------------------------------------------------
@dataclass
class _Job:
    n: int
    top: int
    steps: int
    seed: int
    done: threading.Event
    result: ensemble.SampleResult | None = None
    error: str | None = None
    live: tuple[int, ...] = ()  # clusters with a live expert when the run started


class RouterService(pb_grpc.RouterServicer):
    """Sample requests -> ensemble runs, batched: requests with the same (strategy, steps) that
    arrive while a run is going are served together by the next run."""

    def __init__(
        self,
        router: torch.nn.Module,
        experts: Callable[[], dict[int, Velocity]],
        k: int,
        dim: int,
        image_shape: tuple[int, ...],
        max_n: int = 256,
        default_steps: int = 50,
        max_steps: int = 500,
        max_batch: int = 1024,
        per_client: TokenBuckets | None = None,
        max_image_steps: int = 256 * 50,
    ):
        """`router`: p(cluster | x_t, t); `experts()`: the live experts' velocities by cluster; `k`: clusters;
        `dim`: values per image; `image_shape`: how a reply shapes them; `max_n`, `default_steps`, `max_steps`:
        bounds and default of one request; `max_batch`: images in one batched run; `per_client`: a token bucket per
        client address that every Sample spends from (None: no limit); `max_image_steps`: the most n x steps one
        request may ask for, so a heavy request holds a small one behind it for a bounded time."""
        self.per_client = per_client
        self._refusals = Refusals("a Sample request")
        self.refused = self._refusals.counts  # Sample requests refused, by reason (rate, bad_request)
        self.router, self.experts, self.k, self.dim, self.image_shape = router, experts, k, dim, image_shape
        self.max_n, self.default_steps, self.max_steps, self.max_batch = max_n, default_steps, max_steps, max_batch
        self.max_image_steps = max_image_steps
        self.runs = 0  # ensemble runs (fewer than requests when batching works)
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="atoll-router", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the batching worker, waiting up to 10 s for a run in progress."""
        self._stop.set()
        self._worker.join(timeout=10)

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> pb.SampleReply:
        """Generate `n` images in [0, 1] with the ensemble (strategy top1 .. topK or full, `steps` Euler steps, noise
        from `seed`), batched with concurrent requests of the same strategy and steps. Aborts with INVALID_ARGUMENT
        for undecodable bytes and bad parameters (n times steps over `max_image_steps` included: a request holds the
        ones behind it for at most that much work), RESOURCE_EXHAUSTED over the client's rate, UNAVAILABLE when no
        expert could serve."""
        self._refusals.refuse_undecodable(request, context)
        if self.per_client is not None and not self.per_client.take(client_host(context.peer())):
            why = "refused: rate (too many Sample requests from here)"
            self._refusals.refuse(context, "rate", grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        if not 1 <= request.n <= self.max_n:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"n must be in [1, {self.max_n}], got {request.n}")
        try:
            top = ensemble.parse_strategy(request.strategy, self.k)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        steps = request.steps or self.default_steps
        if not 1 <= steps <= self.max_steps:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"steps must be in [1, {self.max_steps}]")
        if request.n * steps > self.max_image_steps:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"n x steps = {request.n * steps} is over this router's {self.max_image_steps} per request: ask for "
                f"fewer images or steps, in several requests",
            )
        job = _Job(request.n, top, steps, request.seed, threading.Event())
        self._queue.put(job)
        while not job.done.wait(0.5):
            if not context.is_active():
                return pb.SampleReply()  # the client gave up; the run finishes for the others
        if job.error is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, job.error)
        res = job.result
        images = (res.x.clamp(-1, 1) + 1) / 2
        return pb.SampleReply(
            images=matrix_to_pb(images),
            image_shape=list(self.image_shape),
            served=[pb.ServedBy(clusters=sorted(s), fewest=f) for s, f in zip(res.served, res.fewest)],
            failed=[f"{j}: {why}" for j, why in sorted(res.failed.items())],
            clusters=self.k,
            live=list(job.live),
            per_image=top,
        )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch, rest = [first], []
            total = first.n
            while True:  # everything already waiting that fits this run
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if (job.top, job.steps) == (first.top, first.steps) and total + job.n <= self.max_batch:
                    batch.append(job)
                    total += job.n
                else:
                    rest.append(job)
            for job in rest:
                self._queue.put(job)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        first = batch[0]
        # each request's noise comes from its own seed, so a request's images do not depend on
        # what it was batched with (up to the router/expert arithmetic on a bigger batch)
        x0 = torch.cat([torch.randn(j.n, self.dim, generator=torch.Generator().manual_seed(j.seed)) for j in batch])
        experts = self.experts()
        for job in batch:
            job.live = tuple(sorted(experts))
        try:
            res = ensemble.sample(
                self.router, experts, self.k, len(x0), self.dim, first.steps, first.top, gen=None, x0=x0
            )
            self.runs += 1
        except ensemble.ExpertUnavailable as e:
            for job in batch:
                job.error = f"no expert could serve: {e}"
                job.done.set()
            return
        at = 0
        for job in batch:
            job.result = ensemble.SampleResult(
                res.x[at : at + job.n],
                res.served[at : at + job.n],
                dict(res.failed),
                res.expert_calls,
                res.fewest[at : at + job.n],
            )
            at += job.n
            job.done.set()


def register_expert(servicer: ExpertService, server: grpc.Server) -> None:
    """Serve `servicer` as atoll.v1.Expert on `server`, undecodable requests refused as `bad_request`."""
    add_lenient_service(server, "atoll.v1.Expert", {"Predict": (servicer.Predict, pb.PredictRequest, pb.PredictReply)})


def register_router(servicer: RouterService, server: grpc.Server) -> None:
    """Serve `servicer` as atoll.v1.Router on `server`, undecodable requests refused as `bad_request`."""
    add_lenient_service(server, "atoll.v1.Router", {"Sample": (servicer.Sample, pb.SampleRequest, pb.SampleReply)})
