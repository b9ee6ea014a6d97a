"""The `far-export` command line. Thin: each command parses options and calls one library
function; heavy imports (torch, onnx, tensorrt) happen inside the commands, so
`far-export --help` is instant and works without torch or TensorRT.

Library code raises typed errors with one-line messages; `_run` turns them into
`Error: ...` and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from far_export import __version__
from far_export.serve import ServeOptions
from runtime.limits import ENCODER_VARIANTS, MAX_ENCODER_VARIANTS
from runtime.options import (
    BATCH,
    SEED,
    THREADS,
    FiniteFloat,
    flags,
    one_line_errors,
    request_from_kwargs,
    sampling_flags,
    sampling_options,
)
from runtime.schedule import CFG_SCHEDULES


def _run(fn: Callable[[], Any]) -> Any:
    """Call fn; bad input (FarError, OSError naming a file) becomes a one-line click error (exit 1)."""
    with one_line_errors():
        return fn()


def _engine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The TensorRT builder options `build` and `compile` share."""
    workspace = click.option(
        "--workspace-gb",
        default=4.0,
        show_default=True,
        type=FiniteFloat(min=0, min_open=True, max=1024),
        help="TensorRT builder workspace limit.",
    )
    opt_level = click.option(
        "--opt-level",
        default=3,
        show_default=True,
        type=click.IntRange(0, 5),
        help="TensorRT builder optimisation level (0..5).",
    )
    return workspace(opt_level(f))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="far-export")
def cli() -> None:
    """FAR: export checkpoints to static ONNX graphs and TensorRT engines, and sample from them."""


# -- build / inspect / compile (far_export.build, far_export.inspect, far_export.tensorrt) ----------------


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(),
    help="Engine directory to write, e.g. engines/far-mnist.",
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    help="fp32 | fp16 | bf16 | int8 (QDQ, calibrated on recorded inputs): what runs inside the graphs.",
)
@click.option("--batch", default=8, show_default=True, type=BATCH, help="Images per graph call (static).")
@click.option(
    "--cfg/--no-cfg",
    "cfg_guidance",
    default=None,
    help="Double the batch inside the graphs for classifier-free guidance. "
    "Default: on when the checkpoint's default CFG scale is not 1.",
)
@click.option(
    "--num-iter",
    type=click.IntRange(min=1),
    default=None,
    help="Masked backbone: AR steps the per-step query size is fixed for. Default: the checkpoint's.",
)
@click.option(
    "--encoder-variants",
    type=click.IntRange(min=0, max=MAX_ENCODER_VARIANTS),
    default=ENCODER_VARIANTS,
    show_default=True,
    help="Masked backbone: static encoder variants that run on the known tokens only, their capacities "
    "fitted to the --num-iter schedule (fewest encoder rows). 0: the full backbone at every step.",
)
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the end-to-end check.")
@click.option("--no-validate", is_flag=True, help="Skip the per-graph checks against PyTorch.")
@click.option(
    "--no-end-to-end", is_flag=True, help="Skip the end-to-end check against the reference sampler."
)
@click.option(
    "--engines/--no-engines",
    default=True,
    show_default=True,
    help="Build TensorRT plans where tensorrt and a GPU exist.",
)
@click.option("--require-engines", is_flag=True, help="Fail when TensorRT plans cannot be built here.")
@_engine_options
def build(checkpoint_dir: str, out_dir: str, **kw: Any) -> None:
    """Export a checkpoint to static ONNX graphs, validate them, build TensorRT plans, write the manifest."""

    def go() -> None:
        from training.config import load_checkpoint_config

        load_checkpoint_config(checkpoint_dir)  # a bad config.json fails at once, before torch is imported
        from far_export.build import BuildOptions
        from far_export.build import build as run_build

        opts = BuildOptions(
            precision=kw["precision"],
            batch=kw["batch"],
            cfg_guidance=kw["cfg_guidance"],
            num_iter=kw["num_iter"],
            encoder_variants=kw["encoder_variants"],
            validate=not kw["no_validate"],
            end_to_end=not kw["no_end_to_end"],
            seed=kw["seed"],
            engines=kw["engines"],
            require_engines=kw["require_engines"],
            workspace_gb=kw["workspace_gb"],
            opt_level=kw["opt_level"],
        )
        run_build(checkpoint_dir, out_dir, opts.check(), log=lambda s: click.echo(s))

    _run(go)


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(engine_dir: str, as_json: bool) -> None:
    """Print an engine directory's manifest: graphs, shapes, dtypes, precision, validation, engines."""

    def go() -> None:
        from far_export.inspect import describe

        click.echo(describe(engine_dir, as_json=as_json))

    _run(go)


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--head-steps", type=int, default=None, help="K per token (default: the manifest's).")
@click.option("--num-iter", type=int, default=None, help="Masked AR steps (default: the manifest's).")
@click.option("--json", "as_json", is_flag=True, help="Print the budget as JSON.")
def budget(engine_dir: str, head_steps: int | None, num_iter: int | None, as_json: bool) -> None:
    """Per graph and per image: weights, tensors, FLOPs and calls; and per device (Jetson Orin, L4, H100,
    H200) the lower bounds on time per image from its published peaks, and whether the engines fit."""

    def go() -> None:
        from far_export.budget import engine_budget, format_budget

        b = engine_budget(engine_dir, head_steps=head_steps, num_iter=num_iter)
        click.echo(json.dumps(b.to_dict(), indent=2) if as_json else format_budget(b))

    _run(go)


@cli.command()
@click.argument("engine_dir", type=click.Path())
@_engine_options
@click.option("--no-validate", is_flag=True, help="Skip comparing each plan with ONNX Runtime.")
def compile(engine_dir: str, workspace_gb: float, opt_level: int, no_validate: bool) -> None:
    """Build TensorRT plans from the ONNX graphs already in ENGINE_DIR (imports no torch)."""

    def go() -> None:
        from far_export.tensorrt import EngineSettings, compile_directory

        settings = EngineSettings(workspace_gb=workspace_gb, opt_level=opt_level).check()
        compile_directory(engine_dir, settings, validate=not no_validate, log=lambda s: click.echo(s))
        click.echo(f"updated {engine_dir}/manifest.json")

    _run(go)


# -- import-mar (training.mar_import) ---------------------------------------------------------------------


@cli.command("import-mar")
@click.argument("mar_checkpoint", type=click.Path())
@click.option("--vae", "vae_path", required=True, type=click.Path(), help="MAR's KL-16 VAE, kl16.ckpt.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Checkpoint directory to write.")
@click.option(
    "--online", is_flag=True, help="Import the online weights ('model') instead of the EMA ('model_ema')."
)
@click.option(
    "--num-heads",
    type=click.IntRange(min=1),
    default=None,
    help="Attention heads, for dims other than MAR-B/L/H (the weights do not tell).",
)
@click.option(
    "--cfg", type=float, default=None, help="Default CFG scale. Default: MAR's README (B 2.9, L 3.0, H 3.2)."
)
@click.option(
    "--cfg-schedule", type=click.Choice(CFG_SCHEDULES), default=None, help="Default: linear (MAR's README)."
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Default: 1.0 (MAR's README).",
)
@click.option(
    "--num-iter",
    type=click.IntRange(min=1),
    default=None,
    help="Default AR steps. Default: 256 (MAR's README).",
)
@click.option(
    "--head-steps",
    "-k",
    type=click.IntRange(min=1),
    default=None,
    help="Default denoising steps. Default: 100 (MAR's README).",
)
@click.option("--force", is_flag=True, help="Replace an existing checkpoint directory at --out.")
def import_mar(mar_checkpoint: str, vae_path: str, out_dir: str, online: bool, **kw: Any) -> None:
    """Turn MAR's checkpoint-last.pth (or a release file) + kl16.ckpt into a checkpoint directory."""

    def go() -> None:
        from training.mar_import import MARImportOptions
        from training.mar_import import import_mar as run_import

        opts = MARImportOptions(weights="online" if online else "ema", **kw)
        click.echo(run_import(mar_checkpoint, vae_path, out_dir, opts).summary())

    _run(go)


# -- sample / bench / serve (runtime.pipeline, runtime.bench, far_export.serve: numpy + one backend) --------


BACKEND_FLAGS = {
    "backend": click.option(
        "--backend",
        type=click.Choice(["ort", "trt"]),
        default="ort",
        show_default=True,
        help="ONNX Runtime on the .onnx graphs, or TensorRT on the .plan engines.",
    ),
    "providers": click.option(
        "--providers",
        default="cpu",
        show_default=True,
        help="ONNX Runtime providers in order: cpu, cuda, tensorrt (e.g. 'cuda,cpu'). A GPU provider "
        "that ONNX Runtime cannot use is an error, not a slow fallback.",
    ),
    "threads": click.option("--threads", type=THREADS, default=None, help="ONNX Runtime intra-op threads."),
    "cuda_graph": click.option(
        "--cuda-graph",
        is_flag=True,
        help="TensorRT: capture the whole AR loop of a batch as one CUDA graph (one launch per batch).",
    ),
}
_backend_options = flags(*BACKEND_FLAGS.values())  # sample and bench; serve has no --cuda-graph


@cli.command()
@click.argument("engine_dir", type=click.Path())
@sampling_options
@_backend_options
def sample(
    engine_dir: str, backend: str, providers: str, threads: int | None, cuda_graph: bool, **kw: Any
) -> None:
    """Generate images from an engine directory (flags and layout as training/sample.py's)."""
    req = request_from_kwargs(kw)

    def go() -> None:
        from runtime.images import ImageWriter, parse_classes, request_labels
        from runtime.pipeline import Pipeline

        pipe = Pipeline.load(
            engine_dir, backend=backend, providers=providers, threads=threads, cuda_graph=cuda_graph
        )
        classes = parse_classes(req.classes, pipe.model.num_classes)
        labels = request_labels(classes, req.per_class)
        settings = pipe.settings(
            head_steps=req.head_steps,
            cfg=req.cfg,
            cfg_schedule=req.cfg_schedule,
            temperature=req.temperature,
            num_iter=req.num_iter,
            seed=req.seed,
        )  # resolved once; bad values fail here
        bar = _ImageProgress(len(labels))
        batches = pipe.stream(labels, settings, batch=req.batch, progress=bar.steps)  # checked here
        writer = ImageWriter(labels, len(classes), req.out, req.out_dir, req.overwrite)  # before any work
        with bar:
            for images in batches:
                writer.add(images)  # written as it goes: memory stays flat however many images
        wrote = writer.close()
        click.echo(f"{wrote} in {pipe.timings.wall:.2f}s ({pipe.backend.describe()})")
        if writer.grid_caption:
            click.echo(writer.grid_caption)

    _run(go)


class _ImageProgress:
    """A progress bar in images (as far-sample's): `steps(done, total)` takes the pipeline's AR steps over
    the whole request and shows the images they amount to (a batch counts as it goes, step by step)."""

    def __init__(self, images: int):
        self.images = images
        self._bar: Any = None  # made at the first step, after every check has passed

    def steps(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                desc="sampling",
                total=self.images,
                unit="img",
                leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} img [{elapsed}<{remaining}, "
                "{rate_fmt}]",
            )
        self._bar.update(self.images * done / total - self._bar.n)

    def __enter__(self) -> _ImageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


@cli.command()
@click.argument("engine_dir", type=click.Path())
@sampling_flags("batch", "head_steps", "cfg", "num_iter")
@click.option(
    "--warmup", default=2, show_default=True, type=click.IntRange(0, 10_000), help="Untimed runs first."
)
@click.option(
    "--runs",
    default=10,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Timed runs (one batch each).",
)
@sampling_flags("seed")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the result as JSON.")
@_backend_options
def bench(engine_dir: str, json_path: str | None, **kw: Any) -> None:
    """Time generation: per-stage time (backbone, head, VAE, loop Python), images/s, p50/p95, peak memory."""

    def go() -> None:
        from runtime.bench import BenchOptions, write_json
        from runtime.bench import bench as run_bench
        from runtime.files import check_output_file

        if json_path:
            check_output_file(json_path, "--json")  # before the runs, not after
        result = run_bench(engine_dir, BenchOptions(**kw))
        click.echo(result.summary())
        if json_path:
            click.echo(f"wrote {write_json(result, json_path)}")

    _run(go)


SERVED_SETTINGS = ("head_steps", "cfg", "cfg_schedule", "temperature", "num_iter")  # fixed per served model


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (HTTP and gRPC).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option(
    "--grpc-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="gRPC port (a client can cancel a request there). Default: a free one, printed at start.",
)
@click.option(
    "--repository-only",
    "repository",
    type=click.Path(),
    default=None,
    help="Write a self-contained Triton model repository here (engines inside) and exit: for an NGC "
    "container, a JetPack Triton or Kubernetes.",
)
@sampling_flags(*SERVED_SETTINGS)
@click.option(
    "--queue-delay-us",
    default=ServeOptions.queue_delay_us,
    show_default=True,
    type=click.IntRange(0, 10_000_000),
    help="How long a request waits for others to fill its batch (a small fraction of one batch's time).",
)
@click.option(
    "--max-queue",
    default=ServeOptions.max_queue,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Queued requests beyond this are rejected (not held in memory).",
)
@flags(BACKEND_FLAGS["backend"], BACKEND_FLAGS["providers"], BACKEND_FLAGS["threads"])
def serve(engine_dir: str, host: str, port: int, grpc_port: int, repository: str | None, **kw: Any) -> None:
    """Serve ENGINE_DIR with Triton Inference Server (dynamic batching across requests); the sampling
    settings are fixed per served model."""

    def go() -> None:
        from far_export.serve import check_settings, write_repository
        from far_export.serve import serve as run_serve

        settings = {k: kw[k] for k in SERVED_SETTINGS if kw[k] is not None}
        opts = ServeOptions(
            backend=kw["backend"],
            providers=kw["providers"],
            threads=kw["threads"],
            settings=settings,
            queue_delay_us=kw["queue_delay_us"],
            max_queue=kw["max_queue"],
        )
        check_settings(engine_dir, opts)  # bad settings fail here, not inside the server
        if repository:
            click.echo(f"wrote {write_repository(engine_dir, repository, opts)}")
            return
        run_serve(engine_dir, opts, host, port, log=click.echo, grpc_port=grpc_port)

    _run(go)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
