"""Write docs/cli.md, the command-line reference, from the commands' own `--help`.

    python scripts/cli_reference.py           # rewrite docs/cli.md
    python scripts/cli_reference.py --check   # exit 1 when docs/cli.md or a documented command is stale

The commands are the console scripts the installed package declares (pyproject.toml
[project.scripts]) and, for a click group such as `far-export`, each of its subcommands. Each help
text is what `COMMAND --help` prints at 80 columns. `--check` also reads every command written in
README.md and docs/*.md (code blocks, inline code, command tables) and names any
option its command does not have, so the documentation cannot drift from the CLI unnoticed
(tests/test_cli_reference.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
DIST = "far-export"
WIDTH = "80"  # COLUMNS while the help is rendered: the same text on every terminal

# One example per command, shown above its help; --check verifies its options exist.
EXAMPLES = {
    "far-export build": "far-export build checkpoints/far-mnist --out engines/far-mnist --precision fp32",
    "far-export inspect": "far-export inspect engines/far-mnist --json",
    "far-export sample": (
        "far-export sample engines/far-mnist --classes 0-9 --per-class 8 --seed 0 --out samples/far-mnist.png"
    ),
    "far-export bench": "far-export bench engines/far-mnist --batch 1 --runs 30 --threads 1",
    "far-export compile": "far-export compile engines/far-mnist --workspace-gb 2",
    "far-export serve": "far-export serve engines/far-mnist --port 8000 --threads 2",
    "far-export import-mar": (
        "far-export import-mar pretrained_models/mar/mar_base/checkpoint-last.pth "
        "--vae pretrained_models/vae/kl16.ckpt --out checkpoints/mar-b"
    ),
    "far-train": "far-train --config training/configs/mnist.toml --out runs/far-mnist --threads 1",
    "far-sample": (
        "far-sample --checkpoint checkpoints/far-mnist --classes 0-9 --per-class 8 "
        "--out samples/reference.png"
    ),
    "far-evaluate": "far-evaluate --checkpoint checkpoints/far-mnist --per-class 50 --threads 1",
}

# How the documentation also spells the console scripts.
ALIASES = {
    "python training/train.py": "far-train",
    "python training/sample.py": "far-sample",
    "python training/evaluate.py": "far-evaluate",
}

OPTION = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def console_scripts() -> dict[str, Callable[[], object]]:
    """name -> entry function of every console script the installed package declares."""
    try:
        eps = importlib.metadata.distribution(DIST).entry_points
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"Error: {DIST} is not installed here: pip install -e . first") from None
    out = {}
    for ep in sorted((e for e in eps if e.group == "console_scripts"), key=lambda e: e.name):
        module, _, attr = ep.value.partition(":")
        out[ep.name] = getattr(importlib.import_module(module), attr)
    return out


def help_text(name: str, main: Callable[[], object], args: list[str]) -> str:
    """What `name *args --help` prints, from the entry function itself (click exits after the help)."""
    buf = io.StringIO()
    saved_argv, saved_cols = sys.argv, os.environ.get("COLUMNS")
    sys.argv, os.environ["COLUMNS"] = [name, *args, "--help"], WIDTH
    try:
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main()
    finally:
        sys.argv = saved_argv
        if saved_cols is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = saved_cols
    text = buf.getvalue()
    if not text.startswith("Usage:"):
        raise SystemExit(f"Error: `{name} {' '.join(args)} --help` printed no click help: {text[:200]!r}")
    return text


def subcommands(text: str) -> list[str]:
    """The names under a click group's 'Commands:' heading."""
    _, found, rest = text.partition("\nCommands:\n")
    if not found:
        return []
    return [line.split()[0] for line in rest.splitlines() if line.startswith("  ") and line.split()]


def all_help() -> dict[str, str]:
    """'far-export build' / 'far-train' / ... -> its help text, groups followed by their subcommands, in
    the order of EXAMPLES (commands it does not name after them, alphabetically)."""
    out: dict[str, str] = {}
    for name, main in console_scripts().items():
        text = help_text(name, main, [])
        out[name] = text
        for sub in subcommands(text):
            out[f"{name} {sub}"] = help_text(name, main, [sub])
    order = [c for c in EXAMPLES if c in out]
    order += [c for c in out if c not in order]
    groups = list(dict.fromkeys(c.split()[0] for c in order))
    order = sorted(order, key=lambda c: (groups.index(c.split()[0]), " " in c, order.index(c)))
    return {c: out[c] for c in order}


def render(helps: dict[str, str]) -> str:
    lines = [
        "# Command-line reference",
        "",
        "Generated by `python scripts/cli_reference.py` from each command's `--help`: do not edit it by",
        "hand (`tests/test_cli_reference.py` fails when it is out of date). Every command also takes `-h`.",
        "The README's [short table](../README.md#commands) says what each is for.",
        "",
    ]
    lines += [f"- [`{cmd}`](#{cmd.replace(' ', '-')})" for cmd in helps]
    for cmd, text in helps.items():
        lines += ["", f"## {cmd}", ""]
        if cmd in EXAMPLES:
            lines += ["```bash", EXAMPLES[cmd], "```", ""]
        lines += ["```text", text.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def documented_commands(markdown: str) -> Iterator[str]:
    """Every command line in a Markdown text: fenced code lines (continuations joined), inline code, and
    each table row whose first cell is a command, with the inline code of its other cells as options."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)
    for block in blocks:
        yield from re.sub(r"\\\n\s*", " ", block).splitlines()
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    for line in prose.splitlines():
        codes = re.findall(r"`([^`\n]+)`", line)
        yield from codes
        if line.startswith("| `") and len(codes) > 1:
            yield " ".join(codes)


def stale_options(markdown: str, helps: dict[str, str]) -> list[str]:
    """'command: --flag' for each option written in the Markdown that its command's help does not list."""
    known = {cmd: set(OPTION.findall(text)) for cmd, text in helps.items()}
    spelled = {**{c: c for c in helps}, **ALIASES}
    problems = []
    for line in documented_commands(markdown):
        for part in re.split(r"&&|\|\||[;|]", line.split(" # ")[0]):
            words = part.split()
            if words and words[0] == "torchrun":  # torchrun's own flags, then the script
                words = ["python", *words[next((i for i, w in enumerate(words) if w.endswith(".py")), 0) :]]
            text = " ".join(words)
            cmd = next(
                (c for c in sorted(spelled, key=len, reverse=True) if text == c or text.startswith(c + " ")),
                None,
            )
            if cmd is None:
                continue
            target = spelled[cmd]
            subs = subcommands(helps[target])
            if subs and len(words) > 1 and not words[1].startswith("-"):
                if words[1] not in subs:
                    problems.append(f"{target}: no command {words[1]!r} (in `{text}`)")
                    continue
                target, cmd = f"{target} {words[1]}", f"{cmd} {words[1]}"
            problems += [
                f"{target}: {opt} (in `{text}`)"
                for opt in OPTION.findall(text[len(cmd) :])
                if opt not in known[target]
            ]
    return problems


def docs_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def missing_examples(helps: dict[str, str]) -> list[str]:
    return [f"EXAMPLES names {c!r}, which is not a command" for c in EXAMPLES if c not in helps]


def check(helps: dict[str, str]) -> list[str]:
    problems = missing_examples(helps)
    if not OUT.is_file() or OUT.read_text() != render(helps):
        problems.append(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/cli_reference.py")
    examples = "```\n" + "\n".join(EXAMPLES.values()) + "\n```\n"
    problems += [f"EXAMPLES: {p}" for p in stale_options(examples, helps)]
    for path in docs_files():
        if path != OUT:
            problems += [f"{path.relative_to(ROOT)}: {p}" for p in stale_options(path.read_text(), helps)]
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when anything is stale")
    args = ap.parse_args()
    helps = all_help()
    if args.check:
        problems = check(helps)
        for p in problems:
            print(p, file=sys.stderr)
        sys.exit(1 if problems else 0)
    missing = missing_examples(helps)
    if missing:
        sys.exit(f"Error: {missing[0]}")
    from runtime.files import write_atomic  # the installed package (checked by console_scripts)

    write_atomic(OUT, render(helps))
    print(f"wrote {OUT.relative_to(ROOT)} ({len(helps)} commands)")


if __name__ == "__main__":
    main()
