"""The AR loop of one engine directory, written once over the backend interface: the state of a batch in
buffers allocated once, and per (num_iter, K) setting a plan, its tables and calls bound once.

One loop serves both backbones and both heads:

- masked backbone: MAR's cosine schedule, a random reveal order per image, the step's
  positions padded to the engines' static Q (padded rows repeat the step's first
  position; they are never written back); each step runs the smallest encoder variant
  (`backbone_k{c}`) whose c slots hold the tokens known at that step, fed their positions
  padded with an unknown one, or the full backbone when none does;
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
stays on the device for the whole batch and the loop can be one CUDA graph.

numpy only: never imports torch, training or far_export.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, Call
from runtime.errors import RequestError
from runtime.images import to_uint8
from runtime.manifest import Manifest, TensorSpec
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
    shortcut_times,
)

Progress = Callable[[int, int], None]  # (AR steps done, AR steps in all)
MAX_PLAN_BYTES = 8 * 2**30  # per-batch random draws held for one (num_iter, K) plan


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


@dataclass
class Plan:
    """Everything one (num_iter, K) setting runs: per AR step its calls (one backbone call, K head calls,
    one update call), bound once to fixed buffers, and the per-batch tables those calls read. Filling the
    tables is the host's whole share of a batch; the steps themselves only run calls."""

    schedule: list[ARStep]
    steps: list[list[Call]]  # per AR step: backbone, K x head, update
    loop: Call  # all steps as one call (a device backend may capture it as one CUDA graph)
    vae: Call  # decodes the tokens buffer the last update writes
    tokens_out: np.ndarray  # (B, L, C) the tokens after the last step
    tables: list[np.ndarray]  # what `Loop.draw` fills per batch, uploaded before the loop
    x0: np.ndarray  # (S, N, C) per step, the head's first input (noise)
    step_noise: np.ndarray | None  # (S, K, N, C) MAR head noise per step and head step
    query: np.ndarray  # (S, B, Q) per step, the queried (masked) or written (causal) positions
    cfg_values: np.ndarray  # (S, 1) per-step CFG scale
    # encoder variants: per capacity c the known positions of its steps (steps_c, B, c), and per step
    # (c, row in that table) or None where the full backbone runs
    known: dict[int, np.ndarray]
    known_rows: list[tuple[int, int] | None]


class Loop:
    """The buffers of one engine batch, allocated once on `backend`, and the plans that run over them.
    Not thread safe: `runtime.pipeline.Pipeline` takes turns on it."""

    def __init__(self, manifest: Manifest, backend: Backend):
        self.manifest, self.backend, self.model = manifest, backend, manifest.model
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
        self._cache: tuple[np.ndarray, ...] = ()
        self.labels = new((self.B,), "int64")
        self.image = new((self.B, 3, m.img_size, m.img_size), "float32")
        self._xa = new((self.N, C), "float32")
        self._xb = new((self.N, C), "float32")
        self._z = new(self._spec("backbone", "z").shape, "float32")
        if m.backbone == "causal":
            cache = self._spec("backbone", "cache")
            self._cache = (new(cache.shape, cache.dtype), new(cache.shape, cache.dtype))
        self._backbone, self._head = backend.graph("backbone"), backend.graph("head")
        self._variants = {c: backend.graph(name) for c, name in manifest.encoder_variants.items()}
        self._update = backend.graph("update")
        vae = backend.graph("vae_decoder")
        self._vae_calls = [vae.bind({"tokens": t}, {"image": self.image}) for t in self._tokens]
        self._plans: dict[tuple[int, int], Plan] = {}

    def _spec(self, graph: str, name: str) -> TensorSpec:
        g = self.manifest.graphs[graph]
        for t in (*g.inputs, *g.outputs):
            if t.name == name:
                return t
        raise BackendError(f"{g.file} has no tensor {name!r}; rebuild with far-export build")

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Token latents (n <= B, L, C) -> the image buffer (B, 3, H, W), its first n rows filled."""
        n = len(tokens)
        buf = self._tokens[0]
        buf[:n] = tokens
        buf[n:] = 0.0
        self.backend.upload([buf])
        self._vae_calls[0].run()
        self.backend.download([self.image])
        return self.image

    def close(self) -> None:
        """Drop the buffers (the backend's memory) and the plans, then close the backend."""
        self._plans.clear()
        self._vae_calls = []
        self._tokens = self._mask = self._cache = ()
        self.labels = self.image = self._xa = self._xb = self._z = None  # type: ignore[assignment]
        self.backend.close()

    # -- preparation --------------------------------------------------------------
    def plan(self, s: SamplingSettings) -> Plan:
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

        # per-batch tables (filled by `draw`) and per-plan constants; tables whose rows are bound one by one
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
        plan = Plan(
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

    def draw(self, plan: Plan, labels: list[int], s: SamplingSettings, keys: list[tuple[int, int]]) -> None:
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
    def run(
        self,
        plan: Plan,
        labels: list[int],
        s: SamplingSettings,
        keys: list[tuple[int, int]],
        progress: Progress | None,
        t: Timings,
    ) -> None:
        """One batch, timed into `t`: fill and upload the tables, then run the steps. Between steps nothing
        but calls run: no numpy, no copy to or from the host (the state lives where the graphs run).
        `progress(done, total)` counts the batch's AR steps."""
        t0 = time.perf_counter()
        self.draw(plan, labels, s, keys)
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

    def images(self, plan: Plan, n: int, t: Timings | None = None) -> np.ndarray:
        """After `run`: the batch's first n images (n, H, W, 3) uint8, decoded and brought back (the only
        thing that comes back)."""
        t0 = time.perf_counter()
        plan.vae.run()
        self.backend.download([self.image])
        if t is not None:
            t.vae += time.perf_counter() - t0
        return to_uint8(self.image[:n])
