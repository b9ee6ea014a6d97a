"""The `far-export` command line. Thin: each command parses options and calls one library
function; heavy imports (torch, onnx, tensorrt) happen inside the commands, so
`far-export --help` is instant and works without torch or TensorRT.

Library code raises typed errors with one-line messages; `_run` turns them into
`Error: ...` and exit code 1, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from far_export import __version__


def _run(fn: Callable[[], Any]) -> Any:
    """Call fn; known errors become one-line click errors (exit 1)."""
    try:
        return fn()
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; nothing was left half-written") from None
    except (RuntimeError, ValueError, OSError) as e:  # our typed errors derive from these
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="far-export")
def cli() -> None:
    """FAR: export checkpoints to static ONNX graphs and TensorRT engines, and sample from them."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
