"""`far-train` and `python training/train.py`: flags -> a RunConfig -> `train`. Errors go through the
CLIs' shared one-line handling (`runtime.options.one_line_errors`)."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path

import click

from runtime.files import WriteError
from runtime.options import one_line_errors
from training.trainer.run_checks import RUN_OPTIONS, is_run

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist.toml"


def run_paths(out: str | None, config: str | None, resume: bool) -> tuple[Path, Path]:
    """(the run directory, the config file): --resume without --config reads the run's own config.toml;
    the run directory defaults to runs/<config name>."""
    out_dir = Path(out) if out else None
    saved = out_dir / "config.toml" if out_dir else None
    if resume and saved is not None and saved.is_file() and config is None:
        path = saved
    else:
        path = Path(config) if config else DEFAULT_CONFIG
    return out_dir or Path("runs") / path.stem, path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(),
    default=None,
    help=f"TOML run config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])}).",
)
@click.option("--out", default=None, help="Run directory (default: runs/<config name>).")
@click.option("--steps", type=int, default=None, help="FAR training steps (train.steps).")
@click.option("--vae-steps", type=int, default=None, help="VAE training steps (vae.steps).")
@click.option("--data", default=None, help="'mnist' or an ImageFolder directory (data.source).")
@click.option(
    "--vae",
    "vae_init",
    default=None,
    help="Use this VAE instead of training one: checkpoint dir, vae.safetensors or MAR kl16.ckpt.",
)
@click.option("--preset", default=None, help="Model preset (model.preset).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="torch CPU threads per process (1 is robust on a busy machine); --resume reuses the first run's.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config key, e.g. train.lr=3e-4.",
)
@click.argument("overrides", nargs=-1)
def command(config_path, out, steps, vae_steps, data, vae_init, preset, resume, threads, sets, overrides):
    """Train the VAE (unless --vae is given) and FAR; KEY=VALUE arguments override config keys."""
    from training.config import ConfigError
    from training.trainer.run import run_options, set_threads, train
    from training.trainer.run_config import load_run_config

    signal.signal(signal.SIGINT, signal.default_int_handler)  # background jobs start with SIGINT ignored
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    out_dir, path = run_paths(out, config_path, resume)
    kept = f"the last checkpoint and resume state are in {out_dir} (continue with --resume)"
    with one_line_errors(stopped=kept):
        try:
            options = {"threads": threads}
            if resume and threads is None:
                options = {**options, **run_options(out_dir)}  # the first run's options, unless given again
                if options.get("threads") is not None:
                    click.echo(
                        f"resuming with --threads {options['threads']} (from {out_dir / RUN_OPTIONS})",
                        err=True,
                    )
            set_threads(options.get("threads"), given=threads is not None)
            extra = list(sets) + list(overrides)
            for name, flag, key in (
                ("--steps", steps, "train.steps"),
                ("--vae-steps", vae_steps, "vae.steps"),
                ("--data", data, "data.source"),
                ("--vae", vae_init, "vae.init"),
                ("--preset", preset, "model.preset"),
            ):
                if flag is None:
                    continue
                clash = [t for t in sets + overrides if t.split("=", 1)[0].strip() == key]
                if clash:  # the flag would win, and the override would never be checked
                    raise ConfigError(f"{name} {flag} and {clash[0]} both set {key}: give one of them")
                extra.append(f"{key}={json.dumps(flag)}")
            run = load_run_config(path, extra)
            t0 = time.time()
            ckpt = train(run, out_dir, resume, options)
        except WriteError as e:  # a full disk, a file size limit: nothing half-written is left
            then = "continue with --resume" if is_run(out_dir) else "run again"
            raise WriteError(f"{e}, then {then}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"checkpoint: {ckpt} ({time.time() - t0:.0f} s)")


def main() -> None:
    """`far-train` (a console script) and `python training/train.py`."""
    command()
