"""Export + validate the far-b preset (MAR-B dims, random weights, ~208M parameters) and record the cost.

    python benchmarks/export_far_b.py [--precision fp32] [--batch 1] [--num-iter 4] [--json out.json]
                                      [--keep DIR]   # keep the engine directory (e.g. for far-export budget)

Writes a random-weight checkpoint (far-b backbone + shortcut head, MAR's KL-16 VAE)
into a temporary directory, runs `far_export.build.build` on it (every graph checked
against PyTorch on random and real inputs; the end-to-end check with `--num-iter`
AR steps to keep CPU time down) and prints the time of each stage, the total and the
process's peak resident memory. TensorRT plans are not part of it (--no-engines).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.config import FARConfig
    from training.model import FAR
    from training.vae import AutoencoderKL


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def random_far(cfg: FARConfig, seed: int = 0) -> tuple[FAR, AutoencoderKL]:
    """A FAR model and its VAE with random weights for `cfg` (the same for the same seed and torch)."""
    import torch

    from training.model import FAR
    from training.vae import AutoencoderKL

    torch.manual_seed(seed)
    model, vae = FAR(cfg), AutoencoderKL(cfg.vae)
    with torch.no_grad():  # AdaLN-zero init makes the head the identity: perturb so its check is real
        for p in (*model.parameters(), *vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval(), vae.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="far-b")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--num-iter", type=int, default=4, help="masked AR steps of the graphs and the end-to-end check"
    )
    ap.add_argument("--no-cfg", action="store_true", help="graphs without CFG doubling")
    ap.add_argument("--no-end-to-end", action="store_true")
    ap.add_argument("--no-validate", action="store_true", help="skip the per-graph checks against PyTorch")
    ap.add_argument("--keep", type=Path, default=None, help="move the engine directory here")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    from far_export.build import BuildOptions, build
    from training.checkpoint import save_checkpoint
    from training.config import preset

    cfg = preset(args.preset, num_iter=args.num_iter)
    lines: list[tuple[float, str]] = []
    t_start = time.perf_counter()

    def log(s: str) -> None:
        lines.append((time.perf_counter() - t_start, s))
        print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)

    with tempfile.TemporaryDirectory(prefix="far-b-export-") as tmp:
        t0 = time.perf_counter()
        model, vae = random_far(cfg)
        params = sum(p.numel() for p in model.parameters())
        vae_params = sum(p.numel() for p in vae.parameters())
        save_checkpoint(Path(tmp) / "ckpt", model, vae)
        del model, vae
        log(
            f"random {args.preset} checkpoint: {params / 1e6:.1f}M params (+{vae_params / 1e6:.1f}M VAE) "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        t0 = time.perf_counter()
        opts = BuildOptions(
            precision=args.precision,
            batch=args.batch,
            cfg_guidance=not args.no_cfg,
            num_iter=args.num_iter,
            end_to_end=not args.no_end_to_end,
            validate=not args.no_validate,
            engines=False,
        )
        manifest = build(Path(tmp) / "ckpt", Path(tmp) / "engines", opts, log=log)
        build_s = time.perf_counter() - t0
        sizes = {n: (Path(tmp) / "engines" / g.file).stat().st_size for n, g in manifest.graphs.items()}
        if args.keep:
            shutil.move(Path(tmp) / "engines", args.keep)

    result = {
        "preset": args.preset,
        "precision": args.precision,
        "batch": args.batch,
        "num_iter": args.num_iter,
        "cfg_guidance": not args.no_cfg,
        "params_million": round(params / 1e6, 1),
        "vae_params_million": round(vae_params / 1e6, 1),
        "build_seconds": round(build_s, 1),
        "export_seconds": round(sum(_secs(s) for _, s in lines if s.startswith("export ")), 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "graph_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "validation": {
            n: {k: {o: st["max"] for o, st in r.items()} for k, r in v.items()}
            for n, v in manifest.validation.get("graphs", {}).items()
        },
        "end_to_end_image_max": manifest.validation.get("end_to_end", {}).get("image", {}).get("max"),
        "stages": [s for _, s in lines],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _secs(line: str) -> float:
    try:
        return float(line.rsplit("(", 1)[1].rstrip("s)"))
    except (IndexError, ValueError):
        return 0.0


if __name__ == "__main__":
    main()
