"""The router's sampler, whatever the transport: bounds and rate limits of a request, batching,
and the answer with the experts that served each image. gRPC `Router.Sample` (service.py) and
the HTTP API (http.py) both submit here, so both obey the same limits and share one token
bucket per client address and one queue.

Requests that ask for the same (strategy, steps) and arrive while a run is going are served
together by the next run, so every expert sees one Predict per step for all of them. Each
request's noise comes from its own seed, so its images do not depend on what it was batched
with (up to the arithmetic of a bigger batch).

Paper: McAllister et al., "Decentralized Diffusion Models", arXiv 2501.05450.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.algo.experts import ensemble
from node.algo.experts.flow import Velocity
from p2pd.admission import TokenBuckets


class SampleRefused(Exception):
    """A request the sampler will not run. `reason`: `invalid` (a bound or the strategy), `rate` (over the client's
    token bucket), `busy` (max_pending requests already waiting) or `unavailable` (no expert could serve, or the
    router is stopping); the message says what to change."""

    def __init__(self, reason: str, message: str):
        """`reason`: invalid, rate, busy or unavailable; `message`: one line for the client."""
        super().__init__(message)
        self.reason = reason


@dataclass
class Answer:
    """What one request gets: `images` (n, C, H, W) float32 in [0, 1]; per image the experts that served it over all
    steps (`served`) and the fewest mixed at one step (`fewest`); the experts dropped during the run (`failed`,
    cluster -> why); K (`clusters`); the clusters with a live expert when the run started (`live`); and how many
    experts the strategy asks for per image (`per_image`)."""

    images: torch.Tensor
    served: list[list[int]]
    fewest: list[int]
    failed: dict[int, str]
    clusters: int
    live: tuple[int, ...]
    per_image: int

    @property
    def missing(self) -> list[int]:
        """Clusters without a live expert when the run started, or dropped during it."""
        return sorted((set(range(self.clusters)) - set(self.live)) | set(self.failed))

    @property
    def complete(self) -> bool:
        """Whether every image mixed as many experts at every step as the strategy asks for, with every expert up."""
        return not self.missing and min(self.fewest, default=self.per_image) >= self.per_image


@dataclass
class _Job:
    n: int
    top: int
    steps: int
    seed: int
    done: threading.Event = field(default_factory=threading.Event)
    result: ensemble.SampleResult | None = None
    error: str | None = None
    live: tuple[int, ...] = ()  # clusters with a live expert when the run started


class Sampler:
    """Bounds, per-client rate, batching queue and worker thread of a router (see the module docstring)."""

    def __init__(
        self,
        router: torch.nn.Module,
        experts: Callable[[], dict[int, Velocity]],
        k: int,
        image_shape: tuple[int, ...],
        max_n: int = 256,
        default_steps: int = 50,
        max_steps: int = 500,
        max_batch: int = 1024,
        per_client: TokenBuckets | None = None,
        max_image_steps: int = 256 * 50,
        max_pending: int = 8,
    ):
        """`router`: p(cluster | x_t, t) over flattened images; `experts()`: the live experts' velocities by cluster;
        `k`: clusters; `image_shape`: (C, H, W) of one image; `max_n`, `default_steps`, `max_steps`: bounds and
        default of one request; `max_batch`: images in one batched run; `per_client`: a token bucket per client
        address that every request spends from (None: no limit); `max_image_steps`: the most n x steps one request
        may ask for, so a heavy request holds a small one behind it for a bounded time; `max_pending`: requests queued
        or running at once, over which a request is refused as `busy` (each holds a server thread while it waits: the
        cap keeps threads free for Health and the other calls)."""
        self.router, self.experts, self.k, self.image_shape = router, experts, k, tuple(image_shape)
        self.dim = int(torch.Size(self.image_shape).numel())
        self.max_n, self.default_steps, self.max_steps, self.max_batch = max_n, default_steps, max_steps, max_batch
        self.per_client, self.max_image_steps, self.max_pending = per_client, max_image_steps, max_pending
        self._pending = threading.BoundedSemaphore(max_pending)
        self.runs = 0  # ensemble runs (fewer than requests when batching works)
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="atoll-router", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the batching worker, waiting up to 10 s for a run in progress; requests still queued, and any
        submitted later, are refused as `unavailable`."""
        self._stop.set()
        self._worker.join(timeout=10)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.error = "the router is stopping"
            job.done.set()

    def check(self, n: int, strategy: str, steps: int, client: str) -> tuple[int, int]:
        """(experts per image, Euler steps) of a request, after spending one token of `client`'s bucket. Raises
        SampleRefused (`rate` or `invalid`) naming the bound that was broken."""
        if self.per_client is not None and not self.per_client.take(client):
            raise SampleRefused("rate", "refused: rate (too many Sample requests from here)")
        if not 1 <= n <= self.max_n:
            raise SampleRefused("invalid", f"n must be in [1, {self.max_n}], got {n}")
        try:
            top = ensemble.parse_strategy(strategy, self.k)
        except ValueError as e:
            raise SampleRefused("invalid", str(e)) from None
        steps = steps or self.default_steps
        if not 1 <= steps <= self.max_steps:
            raise SampleRefused("invalid", f"steps must be in [1, {self.max_steps}], got {steps}")
        if n * steps > self.max_image_steps:
            raise SampleRefused(
                "invalid",
                f"n x steps = {n * steps} is over this router's {self.max_image_steps} per request: ask for fewer "
                f"images or steps, in several requests",
            )
        return top, steps

    def submit(
        self, n: int, strategy: str, steps: int, seed: int, client: str, wanted: Callable[[], bool] = lambda: True
    ) -> Answer | None:
        """Generate `n` images with `strategy` (top1 .. topK, full) in `steps` Euler steps (0: the default) from
        noise of `seed`, batched with concurrent requests; blocks until the run ends. Returns None when `wanted()`
        turned False while waiting (the client left; the run finishes for the others). Raises SampleRefused."""
        top, steps = self.check(n, strategy, steps, client)
        if self._stop.is_set():
            raise SampleRefused("unavailable", "the router is stopping")
        if not self._pending.acquire(blocking=False):
            raise SampleRefused("busy", f"busy: {self.max_pending} sample requests are already waiting; retry shortly")
        try:
            job = _Job(n, top, steps, seed)
            self._queue.put(job)
            while not job.done.wait(0.5):  # bounded: the worker or close() always sets `done`
                if not wanted():
                    return None
                if self._stop.is_set() and not self._worker.is_alive():
                    job.error = job.error or "the router is stopping"
                    break
        finally:
            self._pending.release()
        if job.error is not None:
            raise SampleRefused("unavailable", job.error)
        res = job.result
        images = ((res.x.clamp(-1, 1) + 1) / 2).reshape(n, *self.image_shape)
        return Answer(
            images, [sorted(s) for s in res.served], list(res.fewest), dict(res.failed), self.k, job.live, top
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
        x0 = torch.cat([torch.randn(j.n, self.dim, generator=torch.Generator().manual_seed(j.seed)) for j in batch])
        try:
            experts = self.experts()
            for job in batch:
                job.live = tuple(sorted(experts))
            res = ensemble.sample(
                self.router, experts, self.k, len(x0), self.dim, first.steps, first.top, gen=None, x0=x0
            )
            self.runs += 1
        except Exception as e:  # noqa: BLE001 - every job must end, whatever went wrong in the run
            why = str(e) if isinstance(e, ensemble.ExpertUnavailable) else f"{type(e).__name__}: {e}"
            for job in batch:
                job.error = f"no expert could serve: {why}"
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
