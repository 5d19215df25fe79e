"""STCnet training on the method contract: pixel ranges, target / reference choice against
naive loops, losses against hand values, the D-then-G step (which parameters each
optimiser moves, DDP-safe single calls, the frozen ID guider outside the state dict),
an autocast step, detections lookup, options; tiny widths, random tensors."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vrstc_fakes import save_tiny_clip_net

from reidkit.config import ConfigError, dump_config, load_config
from reidkit.engine.step import StepContext
from reidkit.methods import build_method
from reidkit.methods.vrstc import (
    Detections,
    STCNetMethod,
    clip_references,
    from_gan_range,
    gan_losses,
    load_reid_network,
    masked_l1,
    region_errors,
    select_targets,
    to_gan_range,
)

torch.set_num_threads(1)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY = [
    "model.name=stcnet",
    "data.height=32",
    "data.width=16",
    "model.stcnet.width=4",
    "model.stcnet.disc_width=4",
    "model.stcnet.disc_layers=2",
    "model.stcnet.dilations=[2]",
]


@pytest.fixture(scope="module")
def guider_file(tmp_path_factory):
    return save_tiny_clip_net(tmp_path_factory.mktemp("guider") / "best.pt", num_classes=5)


def tiny_method(*extra, guider=None, num_classes=5) -> STCNetMethod:
    over = [*TINY, *extra]
    if guider is None:
        over.append("model.stcnet.id_weight=0")
    else:
        over.append(f"model.stcnet.reid_weights={guider}")
    torch.manual_seed(0)
    return build_method(load_config(None, over), num_classes)


def clip_batch(b=4, t=3, h=32, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(b, t, 3, h, w, generator=g).clamp(-2, 2)
    return {
        "clips": clips,
        "clip_mask": torch.ones(b, t, dtype=torch.bool),
        "frames": torch.arange(t).expand(b, t).clone(),
        "pids": torch.arange(b) % 5,
        "camids": torch.zeros(b, dtype=torch.long),
        "index": torch.arange(b),
        "paths": [[f"/d/bbox_train/000{i}/f{i}_{k}.jpg" for k in range(t)] for i in range(b)],
    }


# ----------------------------------------------------------------------------- pixels
def test_gan_range_round_trip_and_hand_values():
    x01 = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    normed = (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = to_gan_range(normed, MEAN, STD)
    torch.testing.assert_close(y, 2 * x01 - 1)
    torch.testing.assert_close(from_gan_range(y, MEAN, STD), normed)
    clip = normed[None]  # (1, B, 3, H, W) clips map the same way
    torch.testing.assert_close(to_gan_range(clip, MEAN, STD)[0], 2 * x01 - 1)
    assert to_gan_range(torch.full((1, 3, 1, 1), 9.0), MEAN, STD).max() == 1  # clamped


# ----------------------------------------------------------------------------- targets
def naive_references(valid, frames):
    t = len(valid)
    prev, nxt = [], []
    for i in range(t):
        ok = [j for j in range(t) if valid[j] and frames[j] != frames[i]]
        p = max((j for j in ok if j < i), default=-1)
        n = min((j for j in ok if j > i), default=-1)
        prev.append(p if p >= 0 else n)
        nxt.append(n if n >= 0 else p)
    return prev, nxt


def test_clip_references_match_loop_with_repeated_frames():
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(200, 6, generator=g) < 0.6
    # clips drawn with replacement repeat frames: sorted random indices of short tracklets
    frames = torch.randint(0, 4, (200, 6), generator=g).sort(dim=1).values
    prev, nxt = clip_references(valid, frames)
    for b in range(200):
        p, n = naive_references(valid[b].tolist(), frames[b].tolist())
        assert prev[b].tolist() == p and nxt[b].tolist() == n, b


def test_select_targets_are_valid_uniform_and_seeded():
    valid = torch.tensor(
        [[1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    ).bool()
    frames = torch.arange(5).expand(4, 5)
    counts = torch.zeros(5)
    for seed in range(600):
        tgt, prev, nxt, ok = select_targets(valid, frames, torch.Generator().manual_seed(seed))
        assert ok.tolist() == [True, False, True, False]
        assert valid[0, tgt[0]] and prev[0] != tgt[0] and nxt[0] != tgt[0]
        assert {tgt[2].item(), prev[2].item()} == {0, 2} and prev[2] == nxt[2]
        assert tgt[1] == 0 and tgt[3] == 0  # no target: zero weight, position 0
        counts[tgt[0]] += 1
    assert (counts / 600 - 0.2).abs().max() < 0.06  # uniform over the 5 candidates
    a = select_targets(valid, frames, torch.Generator().manual_seed(3))
    b = select_targets(valid, frames, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_robust_tau_hand_values():
    from reidkit.methods.vrstc import resolve_tau, robust_tau

    s = torch.tensor([0.90, 0.95, 0.96, 0.97, 0.98, float("nan")])
    # median 0.96, |s - med| = 0.06, 0.01, 0, 0.01, 0.02 -> MAD 0.01
    assert robust_tau(s, k=2.0) == pytest.approx(0.96 - 2 * 1.4826 * 0.01)
    assert resolve_tau([s[:3], s[3:]], 0.89, "robust", 2.0) == pytest.approx(robust_tau(s, 2.0))
    assert resolve_tau(s, 0.89) == 0.89
    with pytest.raises(ValueError, match="tau rule"):
        resolve_tau(s, 0.89, "auto")


# ----------------------------------------------------------------------------- losses
def test_masked_l1_hand_values():
    pred = torch.zeros(2, 3, 4, 2)
    target = torch.ones(2, 3, 4, 2)
    mask = torch.zeros(2, 1, 4, 2)
    mask[0, :, :1] = 1  # 2 pixels
    mask[1, :, :2] = 1  # 4 pixels
    target[1] = 3
    assert masked_l1(pred, target, mask).item() == pytest.approx((1 + 3) / 2)
    # frame normalisation: sum / (C H W): 6 / 24 and 36 / 24
    assert masked_l1(pred, target, mask, over="frame").item() == pytest.approx((0.25 + 1.5) / 2)
    weight = torch.tensor([1.0, 0.0])
    assert masked_l1(pred, target, mask, weight).item() == pytest.approx(1.0)


def test_gan_losses_hand_values():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    sp = F.softplus
    d = ((sp(-real) + sp(fake)).mean(), (F.relu(1 - real) + F.relu(1 + fake)).mean())
    assert gan_losses("vanilla", real, fake).item() == pytest.approx(d[0].item())
    assert gan_losses("hinge", real, fake).item() == pytest.approx(d[1].item())
    assert gan_losses("lsgan", real, fake).item() == pytest.approx(
        0.5 * ((1 + 4) / 2 + (0.25 + 9) / 2)
    )
    assert gan_losses("vanilla", None, fake, for_discriminator=False).item() == pytest.approx(
        sp(-fake).mean().item()
    )
    assert gan_losses("hinge", None, fake, for_discriminator=False).item() == -1.75
    w = torch.tensor([0.0, 1.0])
    assert gan_losses("lsgan", None, fake, w, for_discriminator=False).item() == 2.0
    with pytest.raises(ValueError, match="gan_loss"):
        gan_losses("wgan", real, fake)


def test_region_errors_match_loop():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 3, 6, 4, generator=g), torch.rand(3, 3, 6, 4, generator=g)
    mask = (torch.rand(3, 1, 6, 4, generator=g) > 0.5).float()
    mask[2] = 0
    l1, psnr = region_errors(pred, target, mask)
    for n in range(2):
        vals = [
            (float(pred[n, c, y, x]) - float(target[n, c, y, x]))
            for c in range(3)
            for y in range(6)
            for x in range(4)
            if mask[n, 0, y, x] > 0
        ]
        assert l1[n].item() == pytest.approx(255 * sum(abs(v) for v in vals) / len(vals), rel=1e-5)
        mse = sum(v * v for v in vals) / len(vals)
        assert psnr[n].item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert math.isnan(l1[2]) and math.isnan(psnr[2])


# ----------------------------------------------------------------------------- the step
class RecordingContext(StepContext):
    """Counts calls through every ``wrap``-ed module (DDP allows one per backward) and,
    optionally, runs the step under CPU bf16 autocast."""

    def __init__(self, *a, cpu_bf16=False, **kw):
        super().__init__(*a, **kw)
        self.calls: dict[str, int] = {}
        self.cpu_bf16 = cpu_bf16

    def wrap(self, module=None):
        module = self.model if module is None else module
        name = next(n for n, m in self.model.named_modules() if m is module)
        ctx = self

        class Counted(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, *args, **kwargs):
                ctx.calls[name] = ctx.calls.get(name, 0) + 1
                return self.inner(*args, **kwargs)

        return Counted()

    def autocast(self):
        if self.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(a, p.detach()) for a, p in zip(before, params)]


def test_train_step_discriminator_then_generator(guider_file):
    m = tiny_method(guider=guider_file)
    assert m._guider == []  # not loaded before it is used
    cfg = m.cfg
    ctx = RecordingContext(m, m.optimizers(cfg), torch.device("cpu"))
    assert set(ctx.optimizers) == {"g", "d"} and not any(s.default for s in ctx.optimizers.values())
    gen, disc = list(m.stcnet.generator_parameters()), list(m.stcnet.discriminator_parameters())
    guider = list(m.guider.parameters())
    g0, d0, r0 = _snapshot(gen), _snapshot(disc), _snapshot(guider)
    order = []
    real_step = StepContext.step

    def step(self, losses, optimizers=None, extras=None):
        order.append((tuple(optimizers), tuple(losses)))
        return real_step(self, losses, optimizers, extras)

    ctx.step = step.__get__(ctx)
    ctx.set_lr(0.0)
    ctx.begin_iteration(0)
    stats = m.train_step(clip_batch(), ctx)
    ctx.end_iteration()
    assert order == [
        (("d",), ("d_global", "d_local")),
        (("g",), ("l1_x1", "l1_x2", "adv_global", "adv_local", "id")),
    ]
    assert all(math.isfinite(v) for v in stats.values())
    # each sub-network went through its wrapper exactly once (DDP: one call per backward)
    assert ctx.calls == {
        "stcnet.spatial": 1,
        "stcnet.temporal": 1,
        "stcnet.global_disc": 1,
        "stcnet.local_disc": 1,
    }
    assert all(_changed(g0, gen)) or sum(_changed(g0, gen)) > 0.9 * len(gen)
    assert sum(_changed(d0, disc)) > 0.9 * len(disc)
    assert not any(_changed(r0, guider))  # the guider is frozen
    assert all(p.requires_grad for p in disc)  # unfrozen again after the G step
    # the guider is neither in the state dict nor among the parameters
    assert not any("guider" in k for k in m.state_dict())
    assert {id(p) for p in guider}.isdisjoint({id(p) for p in m.parameters()})
    assert not m.guider.training
    m.train()
    assert not m.guider.training  # stays in eval mode


def test_discriminator_step_moves_only_discriminators_and_generator_step_only_generators():
    m = tiny_method()
    ctx = StepContext(m, m.optimizers(m.cfg), torch.device("cpu"))
    gen, disc = list(m.stcnet.generator_parameters()), list(m.stcnet.discriminator_parameters())
    outputs = m(clip_batch())
    g0, d0 = _snapshot(gen), _snapshot(disc)
    ctx.step(m.discriminator_loss(outputs), optimizers=["d"])
    assert not any(_changed(g0, gen)) and any(_changed(d0, disc))
    g0, d0 = _snapshot(gen), _snapshot(disc)
    ctx.step(m.compute_loss(outputs, {}), optimizers=["g"])
    assert any(_changed(g0, gen)) and not any(_changed(d0, disc))


def test_id_guider_gradient_reaches_the_generators(guider_file):
    m = tiny_method("model.stcnet.l1_x1=0", "model.stcnet.l1_x2=0", "model.stcnet.adv_global=0",
                    "model.stcnet.adv_local=0", guider=guider_file)  # fmt: skip
    out = m(clip_batch())
    losses = m.compute_loss(out, {})
    assert set(losses) == {"id"}
    losses["id"].backward()
    assert m.stcnet.spatial.encoder.layers[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.guider.parameters())
    # the guider sees the completion at its own size and normalisation
    net = m._guider[0].net
    seen = {}

    def record(mod, inputs, output):
        seen["shape"] = inputs[0].shape

    net.backbone[0].register_forward_hook(record)
    m.id_loss([out["x2"]], out["pids"], out["weight"])
    assert tuple(seen["shape"][-2:]) == (16, 8)


def test_autocast_step_is_finite_and_float32():
    m = tiny_method()
    ctx = RecordingContext(m, m.optimizers(m.cfg), torch.device("cpu"), cpu_bf16=True)
    ctx.begin_iteration(0)
    stats = m.train_step(clip_batch(), ctx)
    ctx.end_iteration()
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["l1_x2"] > 0


def test_prepare_inputs_respects_detections_and_masks(tmp_path):
    b = clip_batch(b=3, t=4)
    occluded = {("0", 1), ("0", 2), ("1", 0), ("1", 1), ("1", 2), ("1", 3)}
    doc = {"tau": 0.89, "tracklets": {"train": []}}
    for i in range(3):
        frames = [f"bbox_train/000{i}/f{i}_{k}.jpg" for k in range(4)]
        scores = [[0.5 if (str(i), k) in occluded else 0.99] * 3 for k in range(4)]
        doc["tracklets"]["train"].append({"frames": frames, "scores": scores})
    det_path = tmp_path / "scores.json"
    det_path.write_text(json.dumps(doc))
    m = tiny_method(f"model.stcnet.detections={det_path}")
    inp = m.prepare_inputs(b, seed=0)
    # clip 0: frames 0 and 3 unoccluded -> target one of them, the other its reference
    assert inp["weight"].tolist() == [1.0, 0.0, 1.0]
    x = to_gan_range(b["clips"], MEAN, STD)
    assert any(torch.equal(inp["x"][0], x[0, k]) for k in (0, 3))
    assert torch.equal(inp["x_prev"][0], inp["x_next"][0])
    assert not torch.equal(inp["x"][0], inp["x_prev"][0])
    # masks: whole horizontal regions, one region per frame (max_masked=1)
    mask = inp["mask"][:, 0]
    rows = mask.mean(dim=2)
    assert ((rows == 0) | (rows == 1)).all() and inp["regions"].sum(1).tolist() == [1, 1, 1]
    assert torch.equal(m.prepare_inputs(b, 0)["mask"], inp["mask"])  # seeded
    det = Detections(det_path)
    assert det.occluded("/elsewhere/bbox_train/0000/f0_1.jpg") is True
    assert det.occluded("/x/bbox_train/0000/f0_0.jpg") is False
    assert det.occluded("/x/nothing.jpg") is None
    # the robust rule over all 36 scores (18 x 0.5, 18 x 0.99): torch's median is the lower
    # middle value 0.5, the MAD 0, so tau = 0.5 and no score is below it
    robust = Detections(det_path, rule="robust", k=3.0)
    assert robust.tau == pytest.approx(0.5)
    assert robust.occluded("/x/bbox_train/0000/f0_1.jpg") is False
    with pytest.raises(ValueError, match="none of the batch"):
        m.prepare_inputs({**b, "paths": [["/a/b/c.jpg"] * 4] * 3}, 0)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="max_masked"):
        load_config(None, ["model.name=stcnet", "model.stcnet.max_masked=4"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(None, ["model.name=stcnet", "model.stcnet.widht=4"])
    with pytest.raises(ValueError, match="reid_weights is not set"):
        build_method(load_config(None, TINY), 5)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_method(load_config(None, [*TINY, "data.height=30", "model.stcnet.id_weight=0"]), 5)
    cfg = load_config(None, ["model.name=stcnet"])
    # presets: consecutive clips, no erasing / padding, constant schedule, no metric loss
    assert (cfg.data.clip_stride, cfg.data.random_erasing_p, cfg.data.pad) == (1, 0.0, 0)
    assert cfg.solver.scheduler == "constant" and cfg.loss.metric == "none"


def test_guider_with_other_identities_is_refused(guider_file):
    m = tiny_method(guider=guider_file, num_classes=7)  # builds: the guider loads on use
    with pytest.raises(ValueError, match="5 identities, the STCnet training set 7"):
        m.guider  # noqa: B018
    net = load_reid_network(guider_file)
    assert net.num_classes == 5 and not net.net.training
    assert not any(p.requires_grad for p in net.net.parameters())


def test_complete_composites_only_the_mask():
    m = tiny_method().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 32, 16)
    mask[:, :, 10:21] = 1
    x1, x2 = m.complete(x, mask, x.flip(0), x.flip(0))
    for y in (x1, x2):
        torch.testing.assert_close(y * (1 - mask), x * (1 - mask))
        assert not torch.equal(y * mask, x * mask)
    x1b, x2b = m.complete(x, mask, None, None)
    assert torch.equal(x1b, x2b) and torch.equal(x1b, x1)


# ----------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    from reidkit.data.synth import generate_video

    root = tmp_path_factory.mktemp("tinyvideo")
    generate_video(root / "synth-tiny-video", "tiny-video", seed=0, workers=0, height=64,
                   width=32, progress=False)  # fmt: skip
    return root


def _stcnet_config(root, out, guider, **extra):
    over = {
        "output_dir": str(out),
        "device": "cpu",
        "data.dataset": "synth_video",
        "data.synth_preset": "tiny-video",
        "data.root": str(root),
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.seq_len": 3,
        "solver.max_epochs": 3,
        "solver.iters_per_epoch": 2,
        "test.eval_period": 2,
        "model.stcnet.reid_weights": str(guider),
        "model.stcnet.val_tracklets": 4,
        **extra,
    }
    return load_config(None, [*TINY, *(f"{k}={v}" for k, v in over.items())])


def test_stcnet_trains_and_resumes_exactly(tiny_video, tmp_path):
    from reidkit.engine import train
    from reidkit.engine.checkpoint import load_checkpoint

    guider = save_tiny_clip_net(tmp_path / "reid" / "best.pt", num_classes=5, height=32, width=16)
    full = train(_stcnet_config(tiny_video, tmp_path / "full", guider), progress=False)
    part_cfg = _stcnet_config(tiny_video, tmp_path / "part", guider)
    train(part_cfg, stop_after_epochs=2, progress=False)
    train(part_cfg, resume=True, progress=False)
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert not any("guider" in k for k in a["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=0, msg=k)
    assert set(a["optimizers"]) == {"g", "d"}
    assert a["optimizers"]["g"]["state"] and a["optimizers"]["d"]["state"]
    assert a["global_step"] == b["global_step"] == 6 and a["best"] == b["best"]
    # evaluation is the completion of held-out tracklets; best.pt by psnr_x2
    metrics = json.loads((full / "metrics.json").read_text())
    assert {"psnr_x2", "l1_x1", "psnr_copy"} <= set(metrics["final"])
    assert metrics["best"]["psnr_x2"] >= metrics["final"]["psnr_x2"]
    assert (full / "checkpoints" / "best.pt").is_file()
    rows = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if r.get("type") == "epoch"][0]
    assert {"d_global", "d_local", "l1_x1", "l1_x2", "adv_global", "id", "psnr_x2"} <= set(epoch)


DDP_WORKER = """
import os, sys
import torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {repo!r}]
import vrstc_fakes  # registers the tiny guider's method
import reidkit.methods.base as base
import reidkit.methods.vrstc  # registers stcnet
import dataclasses
from reidkit.config import load_config
from reidkit.engine import train

built = []
spec = base._METHODS["stcnet"]

class Recorded(spec.cls):
    def __init__(self, cfg, n):
        super().__init__(cfg, n)
        built.append(self)

base._METHODS["stcnet"] = dataclasses.replace(spec, cls=Recorded)
cfg = load_config({config!r})
train(cfg, progress=False)
rank = int(os.environ["RANK"])
torch.save({{k: v.clone() for k, v in built[0].state_dict().items()}}, {out!r} + f"/rank{{rank}}.pt")
"""


@pytest.mark.timeout(300)
def test_stcnet_two_process_gloo_training(tiny_video, tmp_path):
    """DDP: every sub-network through ctx.wrap, one call per backward; both ranks end with
    the same generators and discriminators (each rank drew its own targets and masks)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    guider = save_tiny_clip_net(tmp_path / "reid" / "best.pt", num_classes=5, height=32, width=16)
    out = tmp_path / "run"
    out.mkdir()
    cfg = _stcnet_config(tiny_video, out, guider, **{"solver.max_epochs": 1, "data.batch_size": 4})
    dump_config(cfg, tmp_path / "cfg.yaml")
    script = tmp_path / "worker.py"
    script.write_text(
        DDP_WORKER.format(
            tests=str(tests),
            repo=str(tests.parent),
            out=str(out),
            config=str(tmp_path / "cfg.yaml"),
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen([*cmd, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("2-process STCnet training timed out:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-2000:] + stderr[-8000:]
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] == 2 and set(ckpt["optimizers"]) == {"g", "d"}
    torch.manual_seed(0)
    init = build_method(cfg, 5)
    for name, _ in init.named_parameters():
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=f"{name} differs")
        torch.testing.assert_close(a[name], ckpt["model"][name])
    moved = [n for n, p in init.named_parameters() if not torch.equal(p.detach(), a[n])]
    assert any(n.startswith("stcnet.spatial") for n in moved)
    assert any(n.startswith("stcnet.global_disc") for n in moved)
