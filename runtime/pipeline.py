"""The FAR generation pipeline: an engine directory opened on one backend, and the requests it serves.

    pipe = Pipeline.load("engines/far-mnist", backend="ort")
    images = pipe.generate(classes=[3, 3, 7], head_steps=4, cfg=2.0, seed=0)   # (3, H, W, 3) uint8

    s = pipe.settings(head_steps=4, seed=0)              # a request's settings, resolved once
    for images in pipe.stream(classes, s, batch=8): ...  # chunk by chunk, checked before the first

A request's checks (classes, settings against the engines, batch, seeds) live here; the AR loop it runs
is `runtime/loop.py`, the randomness contract `runtime/schedule.py`.

numpy only: never imports torch, training or far_export.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from runtime.backends import Backend, open_backend
from runtime.errors import RequestError, exact_int
from runtime.limits import MAX_IMAGES
from runtime.loop import Loop, Plan, Progress, Timings
from runtime.manifest import Manifest, ModelInfo, load_manifest
from runtime.schedule import (
    ARStep,
    SamplingSettings,
    causal_schedule,
    encoder_capacity,
    masked_schedule,
    max_tokens_per_step,
)


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


def _check_progress(progress: Progress | None) -> None:
    if progress is not None and not callable(progress):
        raise RequestError(f"progress must be a function (done, total) or None, got {progress!r}")


class Pipeline:
    """An engine directory opened on one backend, with every buffer allocated once.

    Thread safety: one pipeline may be shared by threads. Its buffers hold one batch at a time, so calls
    take turns (a lock held per engine batch: `stream` lets others run between its chunks);
    for parallel generation open one pipeline per thread. A call from inside a `progress` callback of
    the same pipeline is refused (RequestError), as is any use after `close()`.

    Errors: bad requests raise RequestError, unusable engines ManifestError or BackendError (all
    FarError subclasses with one-line messages); integer arguments take exact integers only (Python or
    numpy ints, never bools, floats or strings)."""

    def __init__(self, directory: Path, manifest: Manifest, backend: Backend):
        self.directory, self.manifest, self.backend = directory, manifest, backend
        self._loop = Loop(manifest, backend)
        self.B, self.Q, self.guided = self._loop.B, self._loop.Q, self._loop.guided
        self.timings = Timings()
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside a call, while it holds the lock
        self._closed = False
        self._loop.plan(self.settings())  # bind everything once, so a mismatched graph fails at load time

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

    @property
    def image(self) -> np.ndarray | None:
        """The engine batch's image buffer (B, 3, H, W) float32 (the backend's memory; None once closed)."""
        return self._loop.image

    # -- requests ---------------------------------------------------------------
    def settings(
        self,
        head_steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        num_iter: int | None = None,
        seed: int = 0,
    ) -> SamplingSettings:
        """A request's settings, resolved once: defaults from the manifest (runtime/schedule.py's one
        resolver), checked against what the engines were built for. `stream`, `sample_tokens` and
        `generate_rows` take the result."""
        m = self.model
        s = SamplingSettings.resolve(
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
        written as it goes with flat memory: `stream` with these settings. Everything is checked before
        the first image."""
        settings = self.settings(head_steps, cfg, cfg_schedule, temperature, num_iter, seed)
        yield from self.stream(classes, settings, batch, progress)

    def stream(
        self,
        classes: Sequence[int],
        settings: SamplingSettings,
        batch: int | None = None,
        progress: Progress | None = None,
    ) -> Iterator[np.ndarray]:
        """The images of a request with settings from `Pipeline.settings`, one chunk of `batch` (n, H, W, 3)
        uint8 at a time. Everything is checked here, when called; the chunks are made as the iterator
        is drawn. `progress(done, total)` counts AR steps over the whole request."""
        with self._turn():
            labels = self.check_labels(classes)
            s = self._checked(settings)
            batch = self.check_batch(batch)
            _check_progress(progress)
            plan = self._loop.plan(s)
        return self._chunks(labels, s, plan, batch, progress)

    def _chunks(
        self, labels: list[int], s: SamplingSettings, plan: Plan, batch: int, progress: Progress | None
    ) -> Iterator[np.ndarray]:
        t = self.timings = Timings()
        start = time.perf_counter()
        chunks = range(0, len(labels), batch)
        S = len(plan.schedule)
        total = len(chunks) * S
        for c, first in enumerate(chunks):
            chunk = labels[first : first + batch]
            step_progress = (lambda i, n, base=c * S: progress(base + i, total)) if progress else None
            with self._turn():  # the buffers hold this chunk until its images are copied out
                self.timings = t
                keys = [(s.seed, first + b) for b in range(len(chunk))]
                self._loop.run(plan, chunk, s, keys, step_progress, t)
                images = self._loop.images(plan, len(chunk), t)
                t.images += len(chunk)
                t.wall = time.perf_counter() - start
            yield images

    def sample_tokens(
        self,
        labels: Sequence[int],
        settings: SamplingSettings,
        first_index: int = 0,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Token latents (n, L, C) float32 for at most one engine batch of images first_index.. (the
        runtime's counterpart of training.sample.sample_tokens)."""
        with self._turn():
            labels = self.check_labels(labels)
            self.check_batch(len(labels))
            settings = self._checked(settings)
            first_index = exact_int("first_index", first_index)
            if first_index < 0:
                raise RequestError(f"first_index must be >= 0, got {first_index}")
            _check_progress(progress)
            plan = self._loop.plan(settings)
            keys = [(settings.seed, first_index + b) for b in range(len(labels))]
            self._loop.run(plan, labels, settings, keys, progress, self.timings)
            self.backend.download([plan.tokens_out])
            return plan.tokens_out[: len(labels)].copy()

    def generate_rows(
        self,
        classes: Sequence[int],
        seeds: Sequence[int],
        indices: Sequence[int],
        settings: SamplingSettings,
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
            settings = self._checked(settings)
            plan = self._loop.plan(settings)
            self._loop.run(plan, labels, settings, keys, progress, self.timings)
            return self._loop.images(plan, len(labels))

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
            return self._loop.decode(tokens)[:n].copy()

    def _checked(self, settings: SamplingSettings) -> SamplingSettings:
        """A settings object a caller passes in, checked again against these engines (it may come from
        another pipeline, or be made by hand)."""
        if not isinstance(settings, SamplingSettings):
            raise RequestError(f"settings must be a Pipeline.settings(...) result, got {settings!r}")
        return self.settings(
            settings.head_steps,
            settings.cfg,
            settings.cfg_schedule,
            settings.temperature,
            settings.num_iter,
            settings.seed,
        )

    def close(self) -> None:
        """Free the engines; waits for a call in progress. Later calls raise RequestError. The pipeline's
        buffers (`image`, the plans' tables) are the backend's memory: they are dropped first. Images it
        returned are copies and stay valid."""
        if self._owner == threading.get_ident():
            raise RequestError("close() was called from inside this pipeline's own call: close it after")
        with self._lock:
            if not self._closed:
                self._closed = True
                self._loop.close()

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
