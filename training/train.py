"""Train the VAE and FAR: `python training/train.py --config training/configs/mnist.toml`.

Two stages in one run directory:

1. VAE (reconstruction + KL) on images, unless `vae.init` names a VAE to use
   (a checkpoint directory, a `vae.safetensors`, or MAR's `kl16.ckpt`).
2. FAR on cached latents: the VAE encodes the dataset once (posterior moments),
   the latent scale is 1 / std of the latents, FAR trains on posterior samples.

Any config key can be overridden: `--set train.lr=3e-4 model.cfg=3.0` (TOML values).
Scale out with `torchrun --nproc_per_node N training/train.py ...` (DDP: nccl on GPU,
gloo on CPU; `batch_size` is the global batch, split over the processes); `--resume`
continues a run at the same step, optimizer, EMA and data order.

Run directory:
    config.toml         the resolved config          log.jsonl     one JSON object per log line
    vae/                VAE stage: vae.safetensors, train_state.pt, recon grids
    latents.safetensors the latent cache             samples/      sample grids during training
    checkpoint/         config.json + model.safetensors (EMA) + vae.safetensors: what far-export reads
    train_state.pt      FAR resume state (online weights, EMA, optimizer, step)

The training process lives in training/trainer/ (its __init__ lists the modules); this file is
the script.
"""

from __future__ import annotations

from training.trainer.cli import main

if __name__ == "__main__":
    main()
