"""docs/cli.md is the commands' own --help, and every command README.md and docs/*.md write uses only
options that command has (scripts/cli_reference.py). When a CLI option changes, regenerate with
`python scripts/cli_reference.py` and fix the documentation it names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cli_reference.py"
sys.path.insert(0, str(SCRIPT.parent))

import cli_reference  # noqa: E402

HELP = {
    "far-export": "Usage: far-export [OPTIONS] COMMAND [ARGS]...\n\nCommands:\n  build  Export.\n",
    "far-export build": "Usage: far-export build [OPTIONS] CKPT\n\n  --out PATH\n  --cfg / --no-cfg\n",
    "far-train": "Usage: far-train [OPTIONS]\n\n  --config PATH\n",
}


def test_docs_cli_md_is_current_and_documented_commands_use_real_options():
    # a subprocess: click names the program after sys.argv[0], which pytest's own __main__ would change
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_an_option_a_command_does_not_have_is_named_with_its_line():
    md = (
        "```bash\nfar-export build ckpt --out e \\\n    --no-cfg --fp17   # a comment --ignored\n"
        "python training/train.py --config c.toml --steps 5 && far-export build x --outt y\n```\n"
        "Inline: `torchrun --nproc_per_node 2 training/train.py --config c.toml`, `far-export bench --x`.\n"
        "| `far-train` | trains | `--config`, `--conf` |\n"
    )
    assert cli_reference.stale_options(md, HELP) == [
        "far-export build: --fp17 (in `far-export build ckpt --out e --no-cfg --fp17`)",
        "far-train: --steps (in `python training/train.py --config c.toml --steps 5`)",
        "far-export build: --outt (in `far-export build x --outt y`)",
        "far-export: no command 'bench' (in `far-export bench --x`)",
        "far-train: --conf (in `far-train --config --conf`)",
    ]


def test_subcommands_are_read_from_a_group_help():
    assert cli_reference.subcommands(HELP["far-export"]) == ["build"]
    assert cli_reference.subcommands(HELP["far-train"]) == []
