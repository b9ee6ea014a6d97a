"""The FAR generation pipeline: the autoregressive loop, written once over the backend interface.

    pipe = Pipeline.load("engines/far-mnist", backend="ort")
    images = pipe.generate(classes=[3, 3, 7], head_steps=4, cfg=2.0, seed=0)   # (3, H, W, 3) uint8

One loop serves both backbones and both heads:

- masked backbone: MAR's cosine schedule, a random reveal order per image, the step's
  positions padded to the engines' static Q (padded rows repeat the step's first
  position; they are never written back); each step runs the smallest encoder variant
  (`backbone_k{c}`) whose c slots hold the tokens known at that step, fed their positions
  padded with an unknown one, or the full backbone when none does (`backbone_graph`);
- causal backbone: raster order, one token per step, the KV cache ping-ponged
  between two buffers;
- head: K Euler steps of size 1/K (shortcut) or K respaced DDPM steps (MAR head),
  CFG with MAR's linear schedule, temperature;
- update: a small graph writes the step's new tokens at their positions and clears
  their mask bits (tokens and mask ping-pong between two buffers).

Randomness follows `runtime/schedule.py`'s contract, so the result equals
`training/sample.py` for the same seed and settings. All of a batch's draws, query
positions and per-step CFG scales are written into tables before its loop starts and
uploaded once; a step is then one backbone call, K head calls and one update call,
each bound once to fixed buffers (views into those tables). Between steps nothing
else runs: no numpy, no allocation, no copy to or from the host, so on a GPU the state
stays on the device for the whole batch and the loop can be one CUDA graph. Only the
image (or, for `sample_tokens`, the tokens) comes back.

numpy only: never imports torch, training or far_export.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, Call, open_backend
from runtime.errors import RequestError, exact_int
from runtime.images import to_uint8
from runtime.limits import MAX_IMAGES
from runtime.manifest import Manifest, ModelInfo, load_manifest
from runtime.schedule import (
    ARStep,
    SamplingSettings,
    causal_schedule,
    cfg_scale,
    ddpm_sampling_schedule,
    encoder_capacity,
    image_rng,
    known_positions,
    masked_positions,
    masked_schedule,
    max_tokens_per_step,
    shortcut_times,
)

Progress = Callable[[int, int], None]
MAX_PLAN_BYTES = 8 * 2**30  # per-batch random draws held for one (num_iter, K) plan


Settings = SamplingSettings  # resolved from the manifest by Pipeline.settings


def backbone_graph(manifest: Manifest, step: ARStep) -> str:
    """The backbone graph a masked AR step runs: the smallest encoder variant that holds the tokens known at
    the step, else the full backbone (always it for the causal backbone)."""
    capacity = encoder_capacity(step, manifest.model.seq_len, tuple(manifest.encoder_variants))
    return "backbone" if capacity is None else manifest.encoder_variants[capacity]


def steps_per_batch(manifest: Manifest, num_iter: int, head_steps: int) -> dict[str, int]:
    """Calls of each graph in one engine batch of the loop (graphs it does not call: 0)."""
    m = manifest.model
    masked = m.backbone == "masked"
    schedule = masked_schedule(m.seq_len, num_iter) if masked else causal_schedule(m.seq_len)
    calls = dict.fromkeys(manifest.graphs, 0)
    for step in schedule:
        calls[backbone_graph(manifest, step) if masked else "backbone"] += 1
    S = len(schedule)
    return {**calls, "head": S * head_steps, "update": S, "vae_decoder": 1}


@dataclass
class Timings:
    """Where the time of `generate` went, in seconds. `loop` is the AR loop's own Python time:
    the loop's wall time minus its backbone, head and update calls. `prepare` is the per-batch
    work before each loop (random draws, query positions, uploading the tables). On a backend
    that runs the whole loop as one call (TensorRT with CUDA graphs) the loop's time is all
    in `loop`, and on an asynchronous backend the per-call times are enqueue times."""

    backbone: float = 0.0
    head: float = 0.0
    update: float = 0.0
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
# Plans: the tables and bound calls of one (num_iter, K) setting
# ----------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything one (num_iter, K) setting runs: per AR step its calls (one backbone call, K head calls,
    one update call), bound once to fixed buffers, and the per-batch tables those calls read. Filling the
    tables is the host's whole share of a batch; the steps themselves only run calls."""

    schedule: list[ARStep]
    steps: list[list[Call]]  # per AR step: backbone, K x head, update
    loop: Call  # all steps as one call (a device backend may capture it as one CUDA graph)
    vae: Call  # decodes the tokens buffer the last update writes
    tokens_out: np.ndarray  # (B, L, C) the tokens after the last step
    tables: list[np.ndarray]  # what `_draw` fills per batch, uploaded before the loop
    x0: np.ndarray  # (S, N, C) per step, the head's first input (noise)
    step_noise: np.ndarray | None  # (S, K, N, C) MAR head noise per step and head step
    query: np.ndarray  # (S, B, Q) per step, the queried (masked) or written (causal) positions
    cfg_values: np.ndarray  # (S, 1) per-step CFG scale
    # encoder variants: per capacity c the known positions of its steps (steps_c, B, c), and per step
    # (c, row in that table) or None where the full backbone runs
    known: dict[int, np.ndarray]
    known_rows: list[tuple[int, int] | None]


MAX_SEED = 2**63 - 1  # PCG64([seed, index]) takes non-negative integers


def check_keys(seeds: Sequence[int], indices: Sequence[int], n: int) -> list[tuple[int, int]]:
    """(seed, index) per row: n of each, integers in [0, 2**63)."""
    if len(seeds) != n or len(indices) != n:
        raise RequestError(
            f"{n} classes but {len(seeds)} seeds and {len(indices)} indices: give one of each per image"
        )
    for name, values in (("seed", seeds), ("index", indices)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= MAX_SEED:
                raise RequestError(f"{name} {v!r} is not an integer in [0, {MAX_SEED}]: give one in range")
    return [(int(seed), int(index)) for seed, index in zip(seeds, indices)]


class Pipeline:
    """An engine directory opened on one backend, with every buffer allocated once.

    Thread safety: one pipeline may be shared by threads. Its buffers hold one batch at a time, so calls
    take turns (a lock held per engine batch: `generate_batches` lets others run between its chunks);
    for parallel generation open one pipeline per thread. A call from inside a `progress` callback of
    the same pipeline is refused (RequestError), as is any use after `close()`.

    Errors: bad requests raise RequestError, unusable engines ManifestError or BackendError (all
    FarError subclasses with one-line messages); integer arguments take exact integers only (Python or
    numpy ints, never bools, floats or strings)."""

    def __init__(self, directory: Path, manifest: Manifest, backend: Backend):
        self.directory, self.manifest, self.backend = directory, manifest, backend
        m = manifest.model
        self.B = manifest.batch
        self.guided = manifest.cfg_guidance
        self.Q = m.max_query if m.backbone == "masked" else 1
        self.N = self.B * self.Q  # head rows per call
        L, C = m.seq_len, m.token_dim
        new = backend.empty
        # the state of a batch: tokens and mask ping-pong between the update calls, the head's x between
        # its K calls, the causal KV cache between the backbone calls
        self._tokens = (new((self.B, L, C), "float32"), new((self.B, L, C), "float32"))
        self._mask = (new((self.B, L), "float32"), new((self.B, L), "float32"))
        self.labels = new((self.B,), "int64")
        self.image = new((self.B, 3, m.img_size, m.img_size), "float32")
        self._xa = new((self.N, C), "float32")
        self._xb = new((self.N, C), "float32")
        self._z = new(self._graph_out("backbone", "z"), "float32")
        if m.backbone == "causal":
            cache = self._spec("backbone", "cache")
            self._cache = (new(cache.shape, cache.dtype), new(cache.shape, cache.dtype))
        self._backbone, self._head = backend.graph("backbone"), backend.graph("head")
        self._variants = {c: backend.graph(name) for c, name in manifest.encoder_variants.items()}
        self._update = backend.graph("update")
        vae = backend.graph("vae_decoder")
        self._vae_calls = [vae.bind({"tokens": t}, {"image": self.image}) for t in self._tokens]
        self._plans: dict[tuple[int, int], _Plan] = {}
        self.timings = Timings()
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside a call, while it holds the lock
        self._closed = False
        self._plan(self.settings())  # bind everything once, so a mismatched graph fails at load time

    # -- loading ----------------------------------------------------------------
    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: str = "ort",
        providers: Sequence[str] | str | None = None,
        threads: int | None = None,
        cuda_graph: bool = False,
        verify: bool = True,
        spin: bool = False,
    ) -> Pipeline:
        """Open an engine directory: its manifest (schema; with `verify`, the sha256 of every graph),
        then the backend."""
        if not isinstance(directory, (str, os.PathLike)):
            raise RequestError(f"the engine directory must be a path, got {directory!r}")
        if threads is not None and exact_int("threads", threads) < 1:
            raise RequestError(f"threads must be >= 1 (or None for the default), got {threads}")
        if providers is not None and not (
            isinstance(providers, str)
            or (isinstance(providers, (list, tuple)) and all(isinstance(p, str) for p in providers))
        ):
            raise RequestError(f"providers must be a name or a list of names, got {providers!r}")
        directory = Path(directory)
        manifest = load_manifest(directory, verify=verify)
        be = open_backend(
            backend,
            directory,
            manifest,
            providers=providers,
            threads=threads,
            cuda_graph=cuda_graph,
            spin=spin,
        )
        try:
            return cls(directory, manifest, be)
        except BaseException:  # a graph that does not match its manifest: release the device first
            be.close()
            raise

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
    def settings(
        self,
        head_steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        num_iter: int | None = None,
        seed: int = 0,
    ) -> Settings:
        """Fill defaults from the manifest (runtime/schedule.py's one resolver) and check the request against
        what the engines were built for."""
        m = self.model
        s = Settings.resolve(
            m,
            seed=seed,
            head_steps=head_steps,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            num_iter=num_iter,
        )
        if s.cfg != 1.0 and not self.guided:
            raise RequestError(
                f"these engines were built without CFG guidance: use cfg 1.0 (got {s.cfg}) "
                "or rebuild with guidance"
            )
        if m.backbone == "masked":
            need = max_tokens_per_step(m.seq_len, s.num_iter)
            if need > self.Q:
                raise RequestError(
                    f"num_iter {s.num_iter} predicts up to {need} tokens per step but the engines "
                    f"query at most {self.Q}; use num_iter >= {m.num_iter} or rebuild"
                )
        return s

    def check_labels(self, classes: Sequence[int]) -> list[int]:
        """The class ids of a request: a list, tuple or 1-d integer array of exact integers in range."""
        if isinstance(classes, np.ndarray):
            if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
                raise RequestError(
                    f"classes must be a 1-d integer array, got shape {classes.shape} dtype {classes.dtype}"
                )
        elif not isinstance(classes, (list, tuple, range)):
            raise RequestError(
                f"classes must be a list of class ids (e.g. [3, 7]), got {type(classes).__name__}"
            )
        if len(classes) > MAX_IMAGES:
            raise RequestError(
                f"{len(classes)} images in one request is more than {MAX_IMAGES}: split it into "
                f"several requests"
            )
        labels = [exact_int("class id", c) for c in classes]
        if not labels:
            raise RequestError("no class given: nothing to generate")
        bad = [c for c in labels if not 0 <= c < self.model.num_classes]
        if bad:
            raise RequestError(
                f"class id {bad[0]} is out of range: this model has classes 0..{self.model.num_classes - 1}"
            )
        return labels

    def check_batch(self, batch: int | None) -> int:
        if batch is None:
            return self.B
        batch = exact_int("batch", batch)
        if batch > self.B:
            raise RequestError(
                f"batch {batch} is larger than the engines were built for ({self.B}); "
                f"use a batch <= {self.B} or rebuild with --batch {batch}"
            )
        if batch < 1:
            raise RequestError(f"batch must be >= 1, got {batch}")
        return batch

    # -- the public API ---------------------------------------------------------
    def generate(
        self,
        classes: Sequence[int],
        head_steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        num_iter: int | None = None,
        seed: int = 0,
        batch: int | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Images (len(classes), H, W, 3) uint8; image i has class classes[i] and draws from PCG64([seed, i]).

        `batch` images go through the engines at a time (default and maximum: the engine
        batch; the last chunk is padded). `progress(done, total)` counts AR steps."""
        return np.concatenate(
            list(
                self.generate_batches(
                    classes, head_steps, cfg, cfg_schedule, temperature, num_iter, seed, batch, progress
                )
            )
        )

    def generate_batches(
        self,
        classes: Sequence[int],
        head_steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        num_iter: int | None = None,
        seed: int = 0,
        batch: int | None = None,
        progress: Progress | None = None,
    ) -> Iterator[np.ndarray]:
        """`generate`, one chunk of `batch` images (n, H, W, 3) uint8 at a time, so that a large request is
        written as it goes with flat memory. Everything is checked before the first image."""
        with self._turn():
            labels = self.check_labels(classes)
            s = self.settings(head_steps, cfg, cfg_schedule, temperature, num_iter, seed)
            batch = self.check_batch(batch)
            if progress is not None and not callable(progress):
                raise RequestError(f"progress must be a function (done, total) or None, got {progress!r}")
            plan = self._plan(s)
        t = self.timings = Timings()
        start = time.perf_counter()
        chunks = range(0, len(labels), batch)
        total = len(chunks) * len(plan.schedule)
        for c, first in enumerate(chunks):
            chunk = labels[first : first + batch]
            base = c * len(plan.schedule)
            step_progress = (lambda i, n, base=base: progress(base + i, total)) if progress else None
            with self._turn():  # the buffers hold this chunk until its images are copied out
                self.timings = t
                keys = [(s.seed, first + b) for b in range(len(chunk))]
                self._sample(plan, chunk, s, keys, step_progress)
                t0 = time.perf_counter()
                plan.vae.run()
                self.backend.download([self.image])  # the only thing that comes back
                t.vae += time.perf_counter() - t0
                t.images += len(chunk)
                t.wall = time.perf_counter() - start
                images = to_uint8(self.image[: len(chunk)])
            yield images

    def sample_tokens(
        self,
        labels: Sequence[int],
        settings: Settings,
        first_index: int = 0,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Token latents (n, L, C) float32 for at most one engine batch of images first_index.. (the
        runtime's counterpart of training.sample.sample_tokens)."""
        with self._turn():
            labels = self.check_labels(labels)
            self.check_batch(len(labels))
            if not isinstance(settings, Settings):
                raise RequestError(f"settings must be a Pipeline.settings(...) result, got {settings!r}")
            settings = self.settings(
                settings.head_steps,
                settings.cfg,
                settings.cfg_schedule,
                settings.temperature,
                settings.num_iter,
                settings.seed,
            )
            first_index = exact_int("first_index", first_index)
            if first_index < 0:
                raise RequestError(f"first_index must be >= 0, got {first_index}")
            if progress is not None and not callable(progress):
                raise RequestError(f"progress must be a function (done, total) or None, got {progress!r}")
            plan = self._plan(settings)
            keys = [(settings.seed, first_index + b) for b in range(len(labels))]
            self._sample(plan, labels, settings, keys, progress)
            self.backend.download([plan.tokens_out])
            return plan.tokens_out[: len(labels)].copy()

    def generate_rows(
        self,
        classes: Sequence[int],
        seeds: Sequence[int],
        indices: Sequence[int],
        settings: Settings,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Images (n <= B, H, W, 3) uint8 for one engine batch of independent rows: row r has class
        classes[r] and draws from PCG64([seeds[r], indices[r]]), so it is the image `generate` gives as
        image indices[r] of a request with seed seeds[r], whatever batch it lands in and whatever
        shares it (a server batches rows of many requests). `progress(done, total)` counts AR steps;
        an exception it raises stops the batch there."""
        with self._turn():
            labels = self.check_labels(classes)
            self.check_batch(len(labels))
            keys = check_keys(seeds, indices, len(labels))
            plan = self._plan(settings)
            self._sample(plan, labels, settings, keys, progress)
            plan.vae.run()
            self.backend.download([self.image])
            return to_uint8(self.image[: len(labels)])

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Token latents (n <= B, L, C) -> images (n, 3, H, W) float32 in [0, 1]."""
        m = self.model
        want = (m.seq_len, m.token_dim)
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 3 or tokens.shape[1:] != want:
            got = tokens.shape if isinstance(tokens, np.ndarray) else type(tokens).__name__
            raise RequestError(f"decode takes token latents of shape (n, {want[0]}, {want[1]}), got {got}")
        if not np.issubdtype(tokens.dtype, np.floating):
            raise RequestError(f"decode takes float token latents, got dtype {tokens.dtype}")
        with self._turn():
            n = len(tokens)
            self.check_batch(n)
            buf = self._tokens[0]
            buf[:n] = tokens
            buf[n:] = 0.0
            self.backend.upload([buf])
            self._vae_calls[0].run()
            self.backend.download([self.image])
            return self.image[:n].copy()

    def close(self) -> None:
        """Free the engines; waits for a call in progress. Later calls raise RequestError. The pipeline's
        buffers (`image`, the plans' tables) are the backend's memory: they are dropped first. Images it
        returned are copies and stay valid."""
        if self._owner == threading.get_ident():
            raise RequestError("close() was called from inside this pipeline's own call: close it after")
        with self._lock:
            if not self._closed:
                self._closed = True
                self._plans.clear()
                self._vae_calls = []
                self._tokens = self._mask = self._cache = ()
                self.labels = self.image = self._xa = self._xb = self._z = None  # type: ignore[assignment]
                self.backend.close()

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the pipeline's buffers for one call (or one chunk of `generate_batches`)."""
        me = threading.get_ident()
        if self._owner == me:
            raise RequestError(
                "this pipeline was called from inside its own call (a progress callback?): "
                "use another Pipeline there"
            )
        with self._lock:
            if self._closed:
                raise RequestError("this pipeline is closed: load the engines again with Pipeline.load")
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- preparation --------------------------------------------------------------
    def _plan(self, s: Settings) -> _Plan:
        """Tables and bound calls for (num_iter, K), made once and reused."""
        m = self.model
        key = (s.num_iter if m.backbone == "masked" else 0, s.head_steps)
        if key in self._plans:
            return self._plans[key]
        new, B, N, C, L, K, Q = (
            self.backend.empty,
            self.B,
            self.N,
            m.token_dim,
            m.seq_len,
            s.head_steps,
            self.Q,
        )
        masked, mar = m.backbone == "masked", m.head == "mar"
        schedule = masked_schedule(L, s.num_iter) if masked else causal_schedule(L)
        S = len(schedule)
        need = S * N * C * 4 * (K + 1 if m.head == "mar" else 1)  # x0 and the MAR head's noise, per batch
        if need > MAX_PLAN_BYTES:
            raise RequestError(
                f"{S} AR steps x {K} head steps need {need / 2**30:.1f} GiB of noise buffers "
                f"(limit {MAX_PLAN_BYTES / 2**30:.0f} GiB): use fewer head steps or a smaller batch"
            )

        # per-batch tables (filled by _draw) and per-plan constants; tables whose rows are bound one by one
        # are `rows` tables: on a device each row starts at an address TensorRT accepts (256-byte aligned)
        rows = self.backend.rows
        x0 = rows(S, (N, C), "float32")
        step_noise = rows(S * K, (N, C), "float32").reshape(S, K, N, C) if mar else None
        query = rows(S, (B, Q), "int64")
        cfg_values = rows(S, (1,), "float32")
        count, pos = rows(S, (1,), "int64"), rows(S, (1,), "int64")
        count[:, 0] = [step.num_pred for step in schedule]
        pos[:, 0] = np.arange(S)
        times = rows(K, (1,), "float32")
        if mar:
            steps, coef_table = ddpm_sampling_schedule(m.diffusion_steps, K)
            times[:, 0] = steps
            coef = rows(K, (6,), "float32")
            coef[:] = coef_table
        else:
            times[:, 0] = shortcut_times(K)
            d = new((1,), "float32")
            d[0] = 1.0 / K
        x_out = self._xb if K % 2 == 1 else self._xa  # head step k writes xb (k even) or xa (k odd)
        caps = tuple(self._variants) if masked else ()
        step_caps = [encoder_capacity(step, L, caps) for step in schedule]
        known = {c: rows(step_caps.count(c), (B, c), "int64") for c in caps if c in step_caps}
        known_rows = [None if c is None else (c, step_caps[:i].count(c)) for i, c in enumerate(step_caps)]

        steps_calls = []
        for i in range(S):
            tokens, tokens_next = self._tokens[i % 2], self._tokens[(i + 1) % 2]
            mask, mask_next = self._mask[i % 2], self._mask[(i + 1) % 2]
            if masked:
                feeds = {"tokens": tokens, "mask": mask, "labels": self.labels, "query": query[i]}
                graph = self._backbone
                if known_rows[i] is not None:  # an encoder variant: the step's known positions
                    c, row = known_rows[i]
                    feeds["known"], graph = known[c][row], self._variants[c]
                backbone = graph.bind(feeds, {"z": self._z})
            else:  # the previous step's head output is the previous token (ignored at position 0)
                cache, cache_next = self._cache[i % 2], self._cache[(i + 1) % 2]
                backbone = self._backbone.bind(
                    {"prev_token": x_out, "pos": pos[i], "labels": self.labels, "cache": cache},
                    {"z": self._z, "cache_out": cache_next},
                )
            heads = []
            for k in range(K):
                x, y = (
                    (x0[i], self._xb) if k == 0 else ((self._xb, self._xa) if k % 2 else (self._xa, self._xb))
                )
                feeds = {"x": x, "t": times[k], "z": self._z}
                if self.guided:
                    feeds["cfg"] = cfg_values[i]
                if mar:
                    feeds.update(coef=coef[k], noise=step_noise[i, k])
                else:
                    feeds["d"] = d
                heads.append(self._head.bind(feeds, {"x_next": y}))
            update = self._update.bind(
                {"tokens": tokens, "mask": mask, "x": x_out, "query": query[i], "n": count[i]},
                {"tokens_out": tokens_next, "mask_out": mask_next},
            )
            steps_calls.append([backbone, *heads, update])
        self.backend.upload([count, pos, times, coef] if mar else [count, pos, times, d])  # once per plan
        tables = [x0, query, cfg_values, self.labels, self._tokens[0], self._mask[0], *known.values()]
        if mar:
            tables.append(step_noise)
        if not masked:
            tables.append(self._cache[0])
        plan = _Plan(
            schedule=schedule,
            steps=steps_calls,
            loop=self.backend.sequence([c for step in steps_calls for c in step]),
            vae=self._vae_calls[S % 2],
            tokens_out=self._tokens[S % 2],
            tables=tables,
            x0=x0,
            step_noise=step_noise,
            query=query,
            cfg_values=cfg_values,
            known=known,
            known_rows=known_rows,
        )
        self._plans[key] = plan
        return plan

    def _draw(self, plan: _Plan, labels: list[int], s: Settings, keys: list[tuple[int, int]]) -> None:
        """Per batch, before the loop: labels, reveal orders, query positions and every random number,
        drawn per image from its (seed, index) key in the contract's order (runtime/schedule.py), into
        the plan's tables."""
        m = self.model
        L, C, Q, K = m.seq_len, m.token_dim, self.Q, s.head_steps
        masked, mar = m.backbone == "masked", m.head == "mar"
        self.labels[:] = 0
        self.labels[: len(labels)] = labels
        plan.x0[:] = 0.0
        for i, step in enumerate(plan.schedule):
            plan.cfg_values[i] = cfg_scale(s.cfg, s.cfg_schedule, L, step) if self.guided else 1.0
            if not masked:
                plan.query[i] = i
        for b in range(self.B):
            real = b < len(labels)
            rng = image_rng(*keys[b]) if real else None
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
                    positions = masked_positions(order, step)
                    plan.query[i, b, :n] = positions
                    plan.query[i, b, n:] = positions[0]  # padded rows: a valid position, never written back
                    if plan.known_rows[i] is not None:
                        c, row = plan.known_rows[i]
                        have = known_positions(order, step)
                        plan.known[c][row, b, : len(have)] = have
                        plan.known[c][row, b, len(have) :] = order[0]  # pads: unknown at every step
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
    def _sample(
        self,
        plan: _Plan,
        labels: list[int],
        s: Settings,
        keys: list[tuple[int, int]],
        progress: Progress | None,
    ) -> None:
        """One batch: fill and upload the tables, then run the steps. Between steps nothing but calls run:
        no numpy, no copy to or from the host (the state lives where the graphs run)."""
        t = self.timings
        t0 = time.perf_counter()
        self._draw(plan, labels, s, keys)
        self._tokens[0][:] = 0.0
        self._mask[0][:] = 1.0
        if self.model.backbone == "causal":
            self._cache[0][:] = 0
        self.backend.upload(plan.tables)
        clock = time.perf_counter
        S = len(plan.steps)
        loop_start = clock()
        t.prepare += loop_start - t0
        if self.backend.fuses_sequences:
            plan.loop.run()  # every step in one launch (one CUDA graph)
            if progress is not None:
                progress(S, S)
        else:
            tb = th = tu = 0.0
            for i, (backbone, *heads, update) in enumerate(plan.steps):
                c0 = clock()
                backbone.run()  # z for this step's queried tokens (cond rows, then uncond rows)
                c1 = clock()
                for call in heads:  # K head steps
                    call.run()
                c2 = clock()
                update.run()  # the new tokens at their positions
                c3 = clock()
                tb, th, tu = tb + c1 - c0, th + c2 - c1, tu + c3 - c2
                if progress is not None:
                    progress(i + 1, S)
            t.backbone, t.head, t.update = t.backbone + tb, t.head + th, t.update + tu
            loop_start += tb + th + tu  # what is left is the loop's own time
        t.loop += clock() - loop_start
        t.batches += 1
        t.backbone_calls += S
        t.head_calls += S * (len(plan.steps[0]) - 2)
