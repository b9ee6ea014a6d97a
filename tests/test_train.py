"""training/train.py: configs and overrides, both stages end to end, resume, Ctrl-C, non-finite loss,
FAR alone on a given VAE, and one-line errors on bad input. Tiny preset on a tiny ImageFolder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import load_checkpoint
from training.config import ConfigError
from training.data import LatentCache, latent_scale
from training.trainer import stages
from training.trainer.cli import command as train_cli
from training.trainer.distributed import Context, batch_indices
from training.trainer.loop import step_seed
from training.trainer.optim import lr_at, param_groups
from training.trainer.run import train
from training.trainer.run_checks import TrainingError
from training.trainer.run_config import OptimConfig, dump_toml, load_run_config, tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import write_image_folder  # noqa: E402


def tiny_overrides(data: Path, far_steps: int = 4, vae_steps: int = 3) -> list[str]:
    return [
        "model.preset=tiny",
        f"data.source={json.dumps(str(data))}",
        "model.num_classes=2",
        f"vae.steps={vae_steps}",
        "vae.batch_size=4",
        "vae.log_every=1",
        "vae.save_every=0",
        "vae.warmup_steps=1",
        f"train.steps={far_steps}",
        "train.batch_size=4",
        "train.log_every=1",
        "train.save_every=2",
        "train.sample_every=0",
        "train.warmup_steps=1",
        "train.sample_classes=2",
        "train.sample_per_class=1",
        'device="cpu"',
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", classes=2, per_class=4, size=16)


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "training" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def test_shipped_configs_parse():
    for path in sorted((ROOT / "training" / "configs").glob("*.toml")):
        run = load_run_config(path)
        run.far_config()


def test_mnist_config_is_the_mnist_preset():
    run = load_run_config(ROOT / "training" / "configs" / "mnist.toml")
    cfg = run.far_config()
    assert (cfg.backbone, cfg.head, cfg.width, cfg.seq_len, cfg.token_dim) == (
        "masked",
        "shortcut",
        128,
        16,
        8,
    )
    assert run.train.betas == (0.9, 0.95) and run.train.weight_decay == 0.02


def test_overrides_any_key_and_resolved_config_roundtrips(tmp_path):
    run = load_run_config(
        ROOT / "training" / "configs" / "mnist.toml",
        ["train.lr=3e-4", "model.cfg=3.0", "model.head=mar", 'data.source="x"', "train.betas=[0.8, 0.9]"],
    )
    assert run.train.lr == 3e-4 and run.far_config().cfg == 3.0 and run.far_config().head == "mar"
    assert run.train.betas == (0.8, 0.9) and run.data.source == "x"
    (tmp_path / "r.toml").write_text(dump_toml(run.to_dict()))
    assert load_run_config(tmp_path / "r.toml") == run
    # the run config's sections go through config.json's checker: TOML ints become floats where floats are due
    whole = load_run_config(None, ["train.lr=1", "train.betas=[0, 0.5]", "vae.kl_weight=0"])
    assert [type(x) for x in (whole.train.lr, *whole.train.betas, whole.vae.kl_weight)] == [float] * 4


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.nope=1", "unknown config key.*train.nope"),
        ("model.width=7", "not divisible"),
        ('train.lr_schedule="step"', "lr_schedule"),
        ('train.steps="many"', "train.steps must be int"),
        ("train.amp=1", "train.amp must be true or false"),
        ('train.betas=[0.9, "x"]', "train.betas must be tuple"),
        ("nonsense", "section.key=value"),
        ("extra.key=1", "unknown config section"),
    ],
)
def test_bad_overrides_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(None, [override])


def test_lr_schedule_and_weight_decay_groups():
    o = OptimConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr=0.1)
    assert lr_at(0, o) == pytest.approx(0.1) and lr_at(9, o) == pytest.approx(1.0)
    assert lr_at(10, o) == pytest.approx(1.0) and lr_at(100, o) == pytest.approx(0.1)
    assert lr_at(55, o) == pytest.approx(0.55)
    c = OptimConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="constant")
    assert lr_at(99, c) == 1.0
    from training.config import preset
    from training.model import FAR

    model = FAR(preset("tiny"))
    no_decay, decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_batch_indices_cover_each_epoch_once():
    ctx = Context(torch.device("cpu"))
    rows = [i for s in range(5) for i in batch_indices(10, s, 2, ctx, seed=0)]
    assert sorted(rows) == list(range(10))
    assert batch_indices(10, 5, 2, ctx, 0) != batch_indices(10, 0, 2, ctx, 0)  # a new order per epoch
    # two ranks split each global batch
    r0 = batch_indices(10, 0, 4, Context(torch.device("cpu"), 0, 2), 0)
    r1 = batch_indices(10, 0, 4, Context(torch.device("cpu"), 1, 2), 0)
    assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)


# ----------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------


def test_both_stages_write_a_loadable_checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    run = load_run_config(None, tiny_overrides(folder) + ["train.sample_every=4"])
    ckpt_dir = train(run, out)
    ckpt = load_checkpoint(ckpt_dir)
    # the latent scale is measured on the cache (1 / std), never the preset's literal
    cache = LatentCache.load(out / "latents.safetensors")
    assert ckpt.cfg.latent_scale == pytest.approx(latent_scale(cache)) and ckpt.cfg.latent_scale != 1.0
    # the exported VAE is the VAE stage's result; model.safetensors holds the EMA weights
    vae_sd = load_file(str(out / "vae" / "vae.safetensors"))
    assert all(torch.equal(vae_sd[k], v) for k, v in ckpt.vae.state_dict().items())
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.equal(state["ema"][k], v) for k, v in ckpt.model.state_dict().items())
    assert not all(torch.equal(state["ema"][k], state["model"][k]) for k in state["ema"])
    # logs, resolved config, sample grid
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("stage") == "far" and "loss" in r] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 for r in log if "loss" in r)
    assert tomllib.loads((out / "config.toml").read_text())["train"]["steps"] == 4
    assert (out / "samples" / "step_000004.png").is_file()
    assert list((out / "vae").glob("recon_*.png"))


def test_resume_continues_exactly(folder, tmp_path):
    const = ['train.lr_schedule="constant"']  # the cosine schedule depends on train.steps
    straight = train(load_run_config(None, tiny_overrides(folder, far_steps=4) + const), tmp_path / "a")
    train(load_run_config(None, tiny_overrides(folder, far_steps=2) + const), tmp_path / "b")
    resumed = train(
        load_run_config(None, tiny_overrides(folder, far_steps=4) + const), tmp_path / "b", resume=True
    )
    a = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for k in a[key]:
            # exact: the same steps on the same data in one process on one machine (the resume contract)
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert (
        load_file(str(straight / "model.safetensors")).keys()
        == load_file(str(resumed / "model.safetensors")).keys()
    )


def test_latent_cache_is_rebuilt_for_another_vae(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "r"
    train(load_run_config(None, tiny_overrides(folder, far_steps=1)), out)
    first = LatentCache.load(out / "latents.safetensors")
    given = tiny_checkpoint(tmp_path / "given")
    train(
        load_run_config(None, tiny_overrides(folder, far_steps=2) + [f"vae.init={json.dumps(str(given))}"]),
        out,
        resume=True,
    )
    second = LatentCache.load(out / "latents.safetensors")
    assert first.source and second.source != first.source and not torch.equal(first.mean, second.mean)


def test_existing_run_needs_resume(folder, tmp_path):
    train(load_run_config(None, tiny_overrides(folder, far_steps=1)), tmp_path / "r")
    with pytest.raises(TrainingError, match="--resume"):
        train(load_run_config(None, tiny_overrides(folder, far_steps=1)), tmp_path / "r")


def test_interrupt_saves_checkpoint_and_state(folder, tmp_path, monkeypatch):
    real_run_stage = stages.run_stage

    def run_stage(stage, *a, **k):
        if stage.name == "far":  # Ctrl-C while fetching the batch of step 3
            real_batch = stage.batch_fn

            def batch_fn(idx, g):
                if torch.initial_seed() == step_seed(stage.opt.seed, 3, 0):
                    raise KeyboardInterrupt
                return real_batch(idx, g)

            stage.batch_fn = batch_fn
        return real_run_stage(stage, *a, **k)

    monkeypatch.setattr(stages, "run_stage", run_stage)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(load_run_config(None, tiny_overrides(folder, far_steps=10) + ["train.save_every=0"]), out)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3
    assert json.loads((out / "checkpoint" / "train_info.json").read_text())["step"] == 3
    load_checkpoint(out / "checkpoint")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path, monkeypatch):
    from training.model import FAR

    real_loss = FAR.loss
    calls = [0]

    def loss(self, *a, **k):
        calls[0] += 1
        value = real_loss(self, *a, **k)
        return value * float("nan") if calls[0] > 2 else value

    monkeypatch.setattr(FAR, "loss", loss)
    out = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"loss is nan at step 2.*last good checkpoint \(step 2\)"):
        train(load_run_config(None, tiny_overrides(folder, far_steps=6)), out)
    assert json.loads((out / "checkpoint" / "train_info.json").read_text())["step"] == 2
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2


def test_far_alone_on_a_given_vae(folder, tmp_path, tiny_checkpoint):
    given = tiny_checkpoint(tmp_path / "given")
    out = tmp_path / "r"
    ckpt_dir = train(
        load_run_config(None, tiny_overrides(folder, far_steps=2) + [f"vae.init={json.dumps(str(given))}"]),
        out,
    )
    assert not (out / "vae").exists()
    got, ref = load_checkpoint(ckpt_dir).vae.state_dict(), load_checkpoint(given).vae.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_fine_tune_starts_from_a_checkpoint(folder, tmp_path, tiny_checkpoint):
    given = tiny_checkpoint(tmp_path / "given", num_classes=2)
    out = tmp_path / "r"
    init = [
        "train.steps=1",
        "train.lr=0.0",
        f"vae.init={json.dumps(str(given))}",
        f"train.init={json.dumps(str(given))}",
    ]
    ckpt = load_checkpoint(train(load_run_config(None, tiny_overrides(folder) + init), out))
    ref = load_checkpoint(given).model.state_dict()
    assert all(torch.equal(ckpt.model.state_dict()[k], ref[k]) for k in ref)  # lr 0: the init itself
    bad = tiny_checkpoint(tmp_path / "bad", num_classes=2, width=64, num_heads=2)
    with pytest.raises(TrainingError, match="train.init: .*does not match"):
        train(
            load_run_config(None, tiny_overrides(folder) + init[:2] + [f"train.init={json.dumps(str(bad))}"]),
            tmp_path / "r2",
        )


@pytest.mark.parametrize("head, backbone", [("mar", "masked"), ("shortcut", "causal")])
def test_other_heads_and_backbones_train(folder, tmp_path, head, backbone):
    run = load_run_config(
        None, tiny_overrides(folder, far_steps=2) + [f'model.head="{head}"', f'model.backbone="{backbone}"']
    )
    cfg = load_checkpoint(train(run, tmp_path / "r")).cfg
    assert (cfg.head, cfg.backbone) == (head, backbone)


# ----------------------------------------------------------------------------
# CLI: one-line errors, no traceback
# ----------------------------------------------------------------------------


def test_cli_missing_config_is_one_line_without_traceback(tmp_path):
    r = run_cli("--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"Error: config file {tmp_path / 'nope.toml'} not found"


@pytest.mark.parametrize("case", ["empty_data", "single_class", "bad_key", "bad_vae", "corrupt_only"])
def test_cli_bad_input_is_one_line(tmp_path, case):
    from click.testing import CliRunner

    args = ["--out", str(tmp_path / "r"), "--preset", "tiny"]
    if case == "empty_data":
        (tmp_path / "empty").mkdir()
        args += ["--data", str(tmp_path / "empty")]
        match = "no class folders"
    elif case == "single_class":
        write_image_folder(tmp_path / "one", classes=1)
        args += ["--data", str(tmp_path / "one")]
        match = "single class"
    elif case == "corrupt_only":
        for c in ("a", "b"):
            (tmp_path / "bad" / c).mkdir(parents=True)
            (tmp_path / "bad" / c / "x.png").write_bytes(b"junk")
        args += ["--data", str(tmp_path / "bad")]
        match = "no readable images"
    elif case == "bad_key":
        args += ["train.bogus=1"]
        match = "unknown config key"
    else:
        args += ["--data", str(write_image_folder(tmp_path / "d")), "--vae", str(tmp_path / "missing.ckpt")]
        match = "does not exist"
    r = CliRunner().invoke(train_cli, args)
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # a ClickException, not an uncaught error
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error:") and match in last, r.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_cli_signal_saves_the_run_and_says_so_in_one_line(folder, tmp_path, sig):
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) during the FAR stage: the checkpoint and resume state
    of the step reached are saved, one `Error:` line says where, exit 128 + the signal. The run's first
    line names torch's thread count."""
    out = tmp_path / "r"
    args = ["--threads", "1", "--out", str(out), *tiny_overrides(folder, far_steps=100_000, vae_steps=1)]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "training" / "train.py"), *args, "train.save_every=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        log = out / "log.jsonl"
        deadline = time.monotonic() + 120
        while not (log.is_file() and '"stage": "far", "step": 1,' in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert "training on cpu, 1 CPU threads" in err
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert errors == [
        f"Error: stopped by {signal.Signals(sig).name}; the last checkpoint and resume state are in {out} "
        "(continue with --resume)"
    ], err
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert step >= 1 and json.loads((out / "checkpoint" / "train_info.json").read_text())["step"] == step
    load_checkpoint(out / "checkpoint")
