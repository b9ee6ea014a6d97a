"""The training process (the networks it trains live one level up, in training/).

run.py          `train`: both stages in one run directory, the thread count, the stored run options
stages.py       the VAE stage, the FAR (or DiT) stage on the latent cache, fine-tune init
loop.py         `run_stage`: the optimisation loop both stages share (resume, EMA, saves, interrupts)
cli.py          `far-train` / `python training/train.py`
run_config.py   the TOML run config and its `section.key=value` overrides
run_checks.py   everything checked before any work
distributed.py  DDP: ranks, this rank's rows of a batch, the all-reducing objective
optim.py        AdamW parameter groups, the LR schedule, the EMA update
"""
