"""The names TensorRT's Python bindings define, per release, read from NVIDIA/TensorRT's own sources.

    python scripts/trt_binding_names.py GIT_DIR [REF ...] > tests/gpusim/trt_names.json

(REFs default to release/8.6 release/10.3 release/11.0.)

GIT_DIR is a clone of github.com/NVIDIA/TensorRT (bare is fine). For each ref the script reads the pybind11
sources (python/src/**/*.cpp) and the wheel's python/packaging/bindings_wheel/tensorrt/__init__.py and writes
{"ref", "commit", "module": [...], "classes": {name: [members]}}: a class's members are its own .def* /
.value names, its pybind11 base classes' members, and the values of enums declared in its scope with
export_values(). The GPU simulator (tests/gpusim/trt.py) exposes only these names for its version, so code
that uses a name a release does not have fails there with AttributeError, as it would on the device.
The regular expressions read the binding style these files use; a miss shows as a missing name in the
simulator (an AttributeError in a test), never as a name that does not exist.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

DECL = re.compile(
    r"py::(class_|enum_)<\s*([\w:]+)((?:\s*,\s*[\w:<>, ]+?)*)>\s*(\w+)?\s*[({]\s*(\w+)\s*,\s*\"(\w+)\""
)
MEMBER = re.compile(
    r"\.(def|def_property|def_property_readonly|def_readwrite|def_readonly|value|def_static)\(\s*\"(\w+)\""
)
MODULE_DEF = re.compile(r"\bm\.def\(\s*\"(\w+)\"")
PY_DEF = re.compile(r"^(?:def|class) (\w+)|^(\w+) = ", re.M)


def git(gitdir: str, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", gitdir, *args], check=True, capture_output=True, text=True
    ).stdout


def names(gitdir: str, ref: str) -> dict:
    files = [
        f
        for f in git(gitdir, "ls-tree", "-r", "--name-only", ref, "python/src").split()
        if f.endswith(".cpp")
    ]
    classes: dict[str, set[str]] = {}
    cpp_to_py: dict[str, str] = {}
    var_to_py: dict[str, str] = {}
    bases: dict[str, list[str]] = {}
    scope: dict[str, str] = {}  # enum -> the class it is declared in (export_values puts its values there)
    exported: set[str] = set()
    module: set[str] = set()
    for f in files:
        text = git(gitdir, "show", f"{ref}:{f}")
        decls = list(DECL.finditer(text))
        for d in decls:
            kind, cpp, extra, var, parent, py = d.groups()
            cpp_to_py[cpp.split("::")[-1]] = py
            if var:
                var_to_py[var] = py
            classes.setdefault(py, set())
            bases[py] = (
                [b.strip().split("::")[-1] for b in extra.split(",") if b.strip()] if kind == "class_" else []
            )
            if parent == "m":
                module.add(py)
            else:
                scope[py] = parent
        # members: each belongs to the nearest declaration above it, or to a `var.def(` chain
        for m in MEMBER.finditer(text):
            before = [d for d in decls if d.start() < m.start()]
            owner_var = re.search(r"(\w+)\s*\.\s*def\([^;]*\Z", text[: m.start() + 1].rsplit(";", 1)[-1])
            if owner_var and owner_var.group(1) in var_to_py:
                owner = var_to_py[owner_var.group(1)]
            elif before:
                owner = before[-1].group(6)
            else:
                continue
            classes.setdefault(owner, set()).add(m.group(2))
        for d in decls:
            tail = text[d.end() : text.find(";", d.end())]
            if "export_values" in tail:
                exported.add(d.group(6))
        module.update(MODULE_DEF.findall(text))
    init = git(gitdir, "show", f"{ref}:python/packaging/bindings_wheel/tensorrt/__init__.py")
    module.update(a or b for a, b in PY_DEF.findall(init))
    # resolve scopes, exported enum values and bases (pybind11 names of C++ base classes)
    for enum, parent in scope.items():
        owner = var_to_py.get(parent, cpp_to_py.get(parent, parent))
        classes.setdefault(owner, set()).add(enum)
        if enum in exported:
            classes[owner] |= classes[enum]

    def members(py: str, seen: frozenset = frozenset()) -> set[str]:
        out = set(classes.get(py, ()))
        for b in bases.get(py, []):
            base = cpp_to_py.get(b)
            if base and base not in seen and base != py:
                out |= members(base, seen | {py})
        return out

    return {
        "ref": ref,
        "commit": git(gitdir, "rev-parse", ref).strip(),
        "module": sorted(module),
        "classes": {py: sorted(members(py)) for py in sorted(classes)},
    }


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: trt_binding_names.py GIT_DIR [REF ...]")
    gitdir, refs = argv[0], argv[1:] or ["release/8.6", "release/10.3", "release/11.0"]
    out = {ref.rsplit("/", 1)[-1]: names(gitdir, ref) for ref in refs}
    json.dump({"source": "https://github.com/NVIDIA/TensorRT", "releases": out}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
