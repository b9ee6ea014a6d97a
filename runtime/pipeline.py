"""The FAR generation pipeline: the autoregressive loop, written once over the backend interface.

    pipe = Pipeline.load("engines/far-mnist", backend="ort")
    images = pipe.generate(classes=[3, 3, 7], head_steps=4, cfg=2.0, seed=0)   # (3, H, W, 3) uint8

One loop serves both backbones and both heads:

- masked backbone: MAR's cosine schedule, a random reveal order per image, the step's
  positions padded to the engines' static Q (padded rows repeat the step's first
  position; their outputs are never read);
- causal backbone: raster order, one token per step, the KV cache ping-ponged
  between two buffers;
- head: K Euler steps of size 1/K (shortcut) or K respaced DDPM steps (MAR head),
  CFG with MAR's linear schedule, temperature.

Randomness follows `runtime/schedule.py`'s contract, so the result equals
`training/sample.py` for the same seed and settings. All of an image's draws are
made before its AR loop starts (same stream, same order), and everything that does
not change between steps (labels, query and scatter indices, noise, step times,
coefficients, buffers and bound calls) is prepared before the loop: a step is a
few bound graph calls, two in-place copies and one scatter, with no allocation.

numpy only: never imports torch, training or far_export.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, Call, open_backend
from runtime.errors import MAX_IMAGES, RequestError, sampling_numbers
from runtime.images import to_uint8
from runtime.manifest import Manifest, ModelInfo, load_manifest
from runtime.schedule import (
    ARStep,
    SamplingSettings,
    causal_schedule,
    cfg_scale,
    check_head_steps,
    ddpm_sampling_schedule,
    image_rng,
    masked_positions,
    masked_schedule,
    max_tokens_per_step,
    shortcut_times,
)

Progress = Callable[[int, int], None]
MAX_PLAN_BYTES = 8 * 2**30  # per-batch random draws held for one (num_iter, K) plan


Settings = SamplingSettings  # resolved from the manifest by Pipeline.settings


@dataclass
class Timings:
    """Where the time of `generate` went, in seconds. `loop` is the AR loop's own Python time:
    the loop's wall time minus its backbone and head calls. `prepare` is the per-batch
    work before each loop (random draws, query and scatter indices)."""

    backbone: float = 0.0
    head: float = 0.0
    vae: float = 0.0
    loop: float = 0.0
    prepare: float = 0.0
    wall: float = 0.0
    images: int = 0
    batches: int = 0
    backbone_calls: int = 0
    head_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------
# Plans: the buffers and bound calls of one (num_iter, K) setting
# ----------------------------------------------------------------------------


@dataclass
class _Plan:
    schedule: list[ARStep]
    backbone_calls: list[Call]  # one per AR step
    head_calls: list[Call]  # K, ping-ponging between two x buffers
    x_in: np.ndarray  # (N, C) the head's first input
    x_out: np.ndarray  # (N, C) the head's last output
    noise: np.ndarray | None  # (K, N, C) MAR head noise bound to the K calls
    x0: np.ndarray  # (S, N, C) per-step initial head input (noise), filled per batch
    step_noise: np.ndarray | None  # (S, K, N, C) MAR head noise, filled per batch
    query: np.ndarray | None  # (S, B, Q) masked query positions, filled per batch
    src: list[np.ndarray]  # per step: head rows holding predicted tokens (B*n,)
    dst: list[np.ndarray]  # per step: flat token rows b*L + pos they go to (B*n,)
    scratch: list[np.ndarray]  # per step: (B*n, C) gather buffer
    cfg_values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (S,) per-step CFG scale


class Pipeline:
    """An engine directory opened on one backend, with every buffer allocated once."""

    def __init__(self, directory: Path, manifest: Manifest, backend: Backend):
        self.directory, self.manifest, self.backend = directory, manifest, backend
        m = manifest.model
        self.B = manifest.batch
        self.guided = manifest.cfg_guidance
        self.Q = m.max_query if m.backbone == "masked" else 1
        self.N = self.B * self.Q  # head rows per call
        L, C = m.seq_len, m.token_dim
        new = backend.empty
        self.tokens = new((self.B, L, C), "float32")
        self.labels = new((self.B,), "int64")
        self.cfg_buf = new((1,), "float32")
        self.image = new((self.B, 3, m.img_size, m.img_size), "float32")
        self._tok2d = self.tokens.reshape(self.B * L, C)
        self._xa = new((self.N, C), "float32")
        self._xb = new((self.N, C), "float32")
        self._z = new(self._graph_out("backbone", "z"), "float32")
        self._backbone, self._head = backend.graph("backbone"), backend.graph("head")
        if m.backbone == "masked":
            self.mask = new((self.B, L), "float32")
            self._mask1d = self.mask.reshape(-1)
        else:
            cache = self._spec("backbone", "cache")
            self.pos = new((1,), "int64")
            self.prev = new((self.B, C), "float32")
            self._cache = (new(cache.shape, cache.dtype), new(cache.shape, cache.dtype))
        self._vae_call = backend.graph("vae_decoder").bind({"tokens": self.tokens}, {"image": self.image})
        self._plans: dict[tuple[int, int], _Plan] = {}
        self.timings = Timings()
        self._plan(self.settings())  # bind everything once, so a mismatched graph fails at load time

    # -- loading ----------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, backend: str = "ort", providers: Sequence[str] | str | None = None,
             threads: int | None = None, cuda_graph: bool = False, verify: bool = True,
             spin: bool = False) -> Pipeline:
        """Open an engine directory: its manifest (schema; with `verify`, the sha256 of every graph),
        then the backend."""
        directory = Path(directory)
        manifest = load_manifest(directory, verify=verify)
        be = open_backend(backend, directory, manifest, providers=providers, threads=threads, cuda_graph=cuda_graph,
                          spin=spin)
        return cls(directory, manifest, be)

    @property
    def model(self) -> ModelInfo:
        return self.manifest.model

    def _spec(self, graph: str, name: str):
        g = self.manifest.graphs[graph]
        for t in (*g.inputs, *g.outputs):
            if t.name == name:
                return t
        raise BackendError(f"{g.file} has no tensor {name!r}; rebuild with far-export build")

    def _graph_out(self, graph: str, name: str) -> tuple[int, ...]:
        return self._spec(graph, name).shape

    # -- requests ---------------------------------------------------------------
    def settings(self, head_steps: int | None = None, cfg: float | None = None, cfg_schedule: str | None = None,
                 temperature: float | None = None, num_iter: int | None = None, seed: int = 0) -> Settings:
        """Fill defaults from the manifest and check the request against what the engines were built for."""
        m = self.model
        cfg, temperature = sampling_numbers(m.cfg if cfg is None else cfg,
                                            m.temperature if temperature is None else temperature)
        s = Settings(
            head_steps=m.head_steps if head_steps is None else int(head_steps),
            cfg=cfg,
            cfg_schedule=cfg_schedule or m.cfg_schedule,
            temperature=temperature,
            num_iter=m.num_iter if num_iter is None else int(num_iter),
            seed=int(seed),
        )
        if not 0 <= s.seed < 2**63:
            raise RequestError(f"seed must be in [0, 2^63), got {s.seed}")
        try:
            check_head_steps(m.head, s.head_steps, m.shortcut_levels, m.diffusion_steps)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if s.cfg_schedule not in ("linear", "constant"):
            raise RequestError(f"unknown cfg schedule {s.cfg_schedule!r}: use 'linear' or 'constant'")
        if s.cfg != 1.0 and not self.guided:
            raise RequestError(f"these engines were built without CFG guidance: use cfg 1.0 (got {s.cfg}) "
                               "or rebuild with guidance")
        if m.backbone == "masked":
            if not 1 <= s.num_iter <= m.seq_len:
                raise RequestError(f"num_iter must be in [1, {m.seq_len}], got {s.num_iter}")
            need = max_tokens_per_step(m.seq_len, s.num_iter)
            if need > self.Q:
                raise RequestError(f"num_iter {s.num_iter} predicts up to {need} tokens per step but the engines "
                                   f"query at most {self.Q}; use num_iter >= {m.num_iter} or rebuild")
        return s

    def check_labels(self, classes: Sequence[int]) -> list[int]:
        if len(classes) > MAX_IMAGES:
            raise RequestError(f"{len(classes)} images in one request is more than {MAX_IMAGES}: split it into "
                               f"several requests")
        labels = [int(c) for c in classes]
        if not labels:
            raise RequestError("no class given: nothing to generate")
        bad = [c for c in labels if not 0 <= c < self.model.num_classes]
        if bad:
            raise RequestError(f"class id {bad[0]} is out of range: this model has classes 0..{self.model.num_classes - 1}")
        return labels

    def check_batch(self, batch: int | None) -> int:
        if batch is None:
            return self.B
        batch = int(batch)
        if batch > self.B:
            raise RequestError(f"batch {batch} is larger than the engines were built for ({self.B}); "
                               f"use a batch <= {self.B} or rebuild with --batch {batch}")
        if batch < 1:
            raise RequestError(f"batch must be >= 1, got {batch}")
        return batch

    # -- the public API ---------------------------------------------------------
    def generate(self, classes: Sequence[int], head_steps: int | None = None, cfg: float | None = None,
                 cfg_schedule: str | None = None, temperature: float | None = None, num_iter: int | None = None,
                 seed: int = 0, batch: int | None = None, progress: Progress | None = None) -> np.ndarray:
        """Images (len(classes), H, W, 3) uint8; image i has class classes[i] and draws from PCG64([seed, i]).

        `batch` images go through the engines at a time (default and maximum: the engine
        batch; the last chunk is padded). `progress(done, total)` counts AR steps."""
        return np.concatenate(list(self.generate_batches(classes, head_steps, cfg, cfg_schedule, temperature,
                                                         num_iter, seed, batch, progress)))

    def generate_batches(self, classes: Sequence[int], head_steps: int | None = None, cfg: float | None = None,
                         cfg_schedule: str | None = None, temperature: float | None = None,
                         num_iter: int | None = None, seed: int = 0, batch: int | None = None,
                         progress: Progress | None = None) -> Iterator[np.ndarray]:
        """`generate`, one chunk of `batch` images (n, H, W, 3) uint8 at a time, so that a large request is
        written as it goes with flat memory. Everything is checked before the first image."""
        labels = self.check_labels(classes)
        s = self.settings(head_steps, cfg, cfg_schedule, temperature, num_iter, seed)
        batch = self.check_batch(batch)
        t = self.timings = Timings()
        start = time.perf_counter()
        plan = self._plan(s)
        chunks = range(0, len(labels), batch)
        total = len(chunks) * len(plan.schedule)
        for c, first in enumerate(chunks):
            chunk = labels[first : first + batch]
            base = c * len(plan.schedule)
            step_progress = (lambda i, n, base=base: progress(base + i, total)) if progress else None
            self._sample(plan, chunk, s, first, step_progress)
            t0 = time.perf_counter()
            self._vae_call.run()
            t.vae += time.perf_counter() - t0
            t.images += len(chunk)
            t.wall = time.perf_counter() - start
            yield to_uint8(self.image[: len(chunk)])

    def sample_tokens(self, labels: Sequence[int], settings: Settings, first_index: int = 0,
                      progress: Progress | None = None) -> np.ndarray:
        """Token latents (n, L, C) float32 for at most one engine batch of images first_index.. (the
        runtime's counterpart of training.sample.sample_tokens)."""
        labels = self.check_labels(labels)
        self.check_batch(len(labels))
        plan = self._plan(settings)
        self._sample(plan, labels, settings, first_index, progress)
        return self.tokens[: len(labels)].copy()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Token latents (n <= B, L, C) -> images (n, 3, H, W) float32 in [0, 1]."""
        n = len(tokens)
        self.check_batch(n)
        self.tokens[:n] = tokens
        self.tokens[n:] = 0.0
        self._vae_call.run()
        return self.image[:n].copy()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- preparation --------------------------------------------------------------
    def _plan(self, s: Settings) -> _Plan:
        """Buffers and bound calls for (num_iter, K), made once and reused."""
        m = self.model
        key = (s.num_iter if m.backbone == "masked" else 0, s.head_steps)
        if key in self._plans:
            return self._plans[key]
        new, B, N, C, L, K = self.backend.empty, self.B, self.N, m.token_dim, m.seq_len, s.head_steps
        masked = m.backbone == "masked"
        schedule = masked_schedule(L, s.num_iter) if masked else causal_schedule(L)
        S = len(schedule)
        need = S * N * C * 4 * (K + 1 if m.head == "mar" else 1)  # x0 and the MAR head's noise, per batch
        if need > MAX_PLAN_BYTES:
            raise RequestError(f"{S} AR steps x {K} head steps need {need / 2**30:.1f} GiB of noise buffers "
                               f"(limit {MAX_PLAN_BYTES / 2**30:.0f} GiB): use fewer head steps or a smaller batch")

        # head: K calls, x ping-pongs xa -> xb -> xa ...
        head_in: dict[str, np.ndarray] = {"z": self._z}
        if self.guided:
            head_in["cfg"] = self.cfg_buf
        calls, noise = [], None
        if m.head == "shortcut":
            times = new((K, 1), "float32")
            times[:, 0] = shortcut_times(K)
            d = new((1,), "float32")
            d[0] = 1.0 / K
            for k in range(K):
                x, y = (self._xa, self._xb) if k % 2 == 0 else (self._xb, self._xa)
                calls.append(self._head.bind({**head_in, "x": x, "t": times[k], "d": d}, {"x_next": y}))
        else:
            steps, coef_table = ddpm_sampling_schedule(m.diffusion_steps, K)
            times = new((K, 1), "float32")
            times[:, 0] = steps
            coef = new((K, 6), "float32")
            coef[:] = coef_table
            noise = new((K, N, C), "float32")
            for k in range(K):
                x, y = (self._xa, self._xb) if k % 2 == 0 else (self._xb, self._xa)
                calls.append(self._head.bind(
                    {**head_in, "x": x, "t": times[k], "coef": coef[k], "noise": noise[k]}, {"x_next": y}))
        x_out = self._xb if K % 2 == 1 else self._xa

        # backbone: masked, one call per step over that step's query rows; causal, two calls
        # ping-ponging the KV cache
        query = None
        if masked:
            query = new((S, B, self.Q), "int64")
            bcalls = [
                self._backbone.bind(
                    {"tokens": self.tokens, "mask": self.mask, "labels": self.labels, "query": query[i]},
                    {"z": self._z},
                )
                for i in range(S)
            ]
        else:
            a, b = self._cache
            pair = [
                self._backbone.bind({"prev_token": self.prev, "pos": self.pos, "labels": self.labels, "cache": x},
                                    {"z": self._z, "cache_out": y})
                for x, y in ((a, b), (b, a))
            ]
            bcalls = [pair[i % 2] for i in range(S)]

        # scatter: head row b*Q + q (q < n) -> token row b*L + position
        src, dst, scratch = [], [], []
        for i, step in enumerate(schedule):
            n = step.num_pred
            src.append((np.arange(B)[:, None] * self.Q + np.arange(n)[None, :]).reshape(-1))
            if masked:
                dst.append(np.zeros(B * n, dtype=np.int64))  # filled per batch from the reveal orders
            else:
                dst.append(np.arange(B, dtype=np.int64) * L + i)
            scratch.append(np.zeros((B * n, C), dtype=np.float32))
        plan = _Plan(
            schedule=schedule, backbone_calls=bcalls, head_calls=calls, x_in=self._xa, x_out=x_out, noise=noise,
            x0=np.zeros((S, N, C), np.float32),
            step_noise=np.zeros((S, K, N, C), np.float32) if noise is not None else None,
            query=query, src=src, dst=dst, scratch=scratch, cfg_values=np.zeros(S),
        )
        self._plans[key] = plan
        return plan

    def _draw(self, plan: _Plan, labels: list[int], s: Settings, first_index: int) -> None:
        """Per batch, before the loop: labels, reveal orders, query/scatter indices and every random
        number, drawn per image in the contract's order (runtime/schedule.py)."""
        m = self.model
        L, C, Q, K = m.seq_len, m.token_dim, self.Q, s.head_steps
        masked, mar = m.backbone == "masked", m.head == "mar"
        self.labels[:] = 0
        self.labels[: len(labels)] = labels
        plan.x0[:] = 0.0
        for i, step in enumerate(plan.schedule):
            plan.cfg_values[i] = cfg_scale(s.cfg, s.cfg_schedule, L, step) if self.guided else 1.0
        for b in range(self.B):
            real = b < len(labels)
            rng = image_rng(s.seed, first_index + b) if real else None
            if masked:
                order = rng.permutation(L) if real else np.arange(L)  # padded images: any valid order
            # 1 draw (shortcut) or K draws (MAR: x, then K-1 noises) of (n, C) per step, in step order
            per = K if mar else 1
            draws = rng.standard_normal((per * L, C)) if real else None
            offset = 0
            for i, step in enumerate(plan.schedule):
                n = step.num_pred
                rows = slice(b * Q, b * Q + n)
                if masked:
                    pos = masked_positions(order, step)
                    plan.query[i, b, :n] = pos
                    plan.query[i, b, n:] = pos[0]  # padded rows: a valid position, output ignored
                    plan.dst[i][b * n : (b + 1) * n] = b * L + pos
                if real:
                    block = draws[offset : offset + per * n].reshape(per, n, C)
                    offset += per * n
                    if mar:
                        plan.x0[i, rows] = block[0]
                        plan.step_noise[i, : K - 1, rows] = s.temperature * block[1:]
                    else:
                        plan.x0[i, rows] = s.temperature * block[0]
        if plan.step_noise is not None:
            plan.step_noise[:, K - 1] = 0.0  # no noise at the last denoising step
            if len(labels) < self.B:
                plan.step_noise[:, :, len(labels) * Q :] = 0.0

    # -- the AR loop --------------------------------------------------------------
    def _sample(self, plan: _Plan, labels: list[int], s: Settings, first_index: int,
                progress: Progress | None) -> None:
        t = self.timings
        t0 = time.perf_counter()
        self._draw(plan, labels, s, first_index)
        masked = self.model.backbone == "masked"
        self.tokens[:] = 0.0
        if masked:
            self.mask[:] = 1.0
        else:
            self._cache[0][:] = 0
            self.prev[:] = 0.0
        clock = time.perf_counter
        tb = th = 0.0
        x_in, x_out, noise, x0, step_noise = plan.x_in, plan.x_out, plan.noise, plan.x0, plan.step_noise
        cfg_buf, cfg_values, head_calls = self.cfg_buf, plan.cfg_values, plan.head_calls
        tok2d, src, dst, scratch = self._tok2d, plan.src, plan.dst, plan.scratch
        S = len(plan.schedule)
        loop_start = clock()
        t.prepare += loop_start - t0
        for i, backbone_call in enumerate(plan.backbone_calls):
            if not masked:
                self.pos[0] = i
            c0 = clock()
            backbone_call.run()  # z for this step's queried tokens (cond rows, then uncond rows)
            c1 = clock()
            np.copyto(x_in, x0[i])
            cfg_buf[0] = cfg_values[i]
            if noise is not None:
                np.copyto(noise, step_noise[i])
            c2 = clock()
            for call in head_calls:  # K head steps
                call.run()
            c3 = clock()
            tb += c1 - c0
            th += c3 - c2
            np.take(x_out, src[i], axis=0, out=scratch[i])
            tok2d[dst[i]] = scratch[i]  # the new tokens, at their positions
            if masked:
                self._mask1d[dst[i]] = 0.0
            else:
                np.copyto(self.prev, x_out)
            if progress is not None:
                progress(i + 1, S)
        loop = clock() - loop_start
        t.backbone += tb
        t.head += th
        t.loop += loop - tb - th
        t.batches += 1
        t.backbone_calls += S
        t.head_calls += S * len(head_calls)
