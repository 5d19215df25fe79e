"""The synthetic set rendered on the fly (``data.dataset: synth_render``) and
``reidkit pretrain`` (backbone export, card, resume, epoch snapshots, --init, DDP).

Everything runs at 64x32 on the ``tiny-wide`` preset (58 training images) with a
ResNet-18 and one or two iterations per epoch."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reidkit.cli import main
from reidkit.config import ConfigError, load_config
from reidkit.data.datasets import dataset_from_config
from reidkit.data.loader import ImageDataset, build_train_loader
from reidkit.data.synth import RENDER_PRESETS, SynthRenderConfig, SynthRenderSource
from reidkit.data.synth.camera import _make_cameras
from reidkit.data.synth.knobs import VARIETY_KNOBS
from reidkit.data.synth.rendering import ImageJitter
from reidkit.data.synth.variety import image_jitter, varied_camera
from reidkit.data.transforms import build_test_transforms
from reidkit.engine.pretrain import backbone_tensors, card_path, epoch_weights_path
from reidkit.models import build_backbone, load_pretrained

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.height=64", "data.width=32"]
# one or two iterations per epoch of 8 images, no loader worker, small test batches
FAST = [
    *SMALL,
    "data.batch_size=8",
    "data.num_workers=0",
    "data.test_batch_size=64",
    "data.pad=2",
    "solver.iters_per_epoch=2",
]


def _source(preset: str = "tiny-wide", **knobs) -> SynthRenderSource:
    return SynthRenderSource(SynthRenderConfig(preset=preset, **knobs), 64, 32)


# --------------------------------------------------------------------------- knobs
def test_presets_fill_unset_knobs_and_overrides_win() -> None:
    cfg = load_config(
        None,
        ["data.dataset=synth_render", "data.render.preset=large", "data.render.lighting=0.25"],
    )
    knobs = cfg.data.render
    assert knobs.num_ids == RENDER_PRESETS["large"]["num_ids"] and knobs.plan == "index"
    assert knobs.lighting == 0.25 and knobs.blur == 1.0  # override wins, the rest from preset
    lo, hi = knobs.images_per_id
    assert knobs.num_ids * (lo + hi) / 2 >= 250_000  # hundreds of thousands of images
    # a dumped config (every knob explicit) loads back to the same knobs
    again = SynthRenderConfig.model_validate(knobs.model_dump(mode="json"))
    assert again == knobs
    assert SynthRenderConfig().preset == "market" and SynthRenderConfig().plan == "disk"


def test_knob_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'tiny-wide'"):
        load_config(None, ["data.dataset=synth_render", "data.render.preset=tiny-wid"])
    with pytest.raises(ConfigError, match="data.render.lighting"):
        load_config(None, ["data.render.preset=large", "data.render.lighting=3"])
    with pytest.raises(ConfigError, match="data.render.blurr"):
        load_config(None, ["data.render.blurr=1"])
    with pytest.raises(ConfigError, match="variety knobs must stay 0"):
        load_config(None, ["data.render.preset=market", "data.render.textures=1"])
    with pytest.raises(ConfigError, match="images_per_id"):
        load_config(None, ["data.render.preset=large", "data.render.images_per_id=[5,2]"])
    with pytest.raises(ConfigError, match="backgrounds"):
        load_config(None, ["data.render.preset=large", "data.render.backgrounds=[beach]"])


def test_knobs_at_zero_are_the_on_disk_distributions() -> None:
    zero = SynthRenderConfig(preset="gap-source-narrow")
    assert all(getattr(zero, k) == 0 for k in VARIETY_KNOBS)
    assert image_jitter(zero) == ImageJitter()  # render_sample's own defaults
    narrow = [varied_camera(np.random.default_rng([0, c]), c, zero) for c in range(300)]
    wide_knobs = SynthRenderConfig(preset="gap-source")
    wide = [varied_camera(np.random.default_rng([0, c]), c, wide_knobs) for c in range(300)]
    disk = _make_cameras(np.random.default_rng(0), 6)

    def span(cams, field):
        values = [getattr(c, field) for c in cams]
        return min(values), max(values)

    for field, (lo, hi) in {
        "gain": (0.72, 1.22),
        "saturation": (0.65, 1.1),
        "gamma": (0.85, 1.18),
        "light_gradient": (-0.25, 0.25),
        "scale": (0.84, 0.93),
    }.items():
        n_lo, n_hi = span(narrow, field)
        assert lo - 1e-3 <= n_lo and n_hi <= hi + 1e-3, field  # the on-disk range
        w_lo, w_hi = span(wide, field)
        assert w_lo < lo - 0.02 and w_hi > hi + 0.02, field  # wider at strength 1
        d_lo, d_hi = span(disk, field)
        assert lo - 1e-3 <= d_lo and d_hi <= hi + 1e-3, field
    assert {c.blur for c in narrow} <= {0.0, 0.3, 0.5, 0.7}
    assert {c.background for c in narrow} <= {"pavement", "wall", "park"}
    assert {c.cast for c in wide} - {c.cast for c in narrow}  # perturbed casts


# --------------------------------------------------------------------------- the set
def test_index_plan_is_random_access_and_deterministic() -> None:
    source = _source()
    train = source.records("train")
    order = [11, 3, 40, 3]
    first = [train.load_image(i) for i in order]
    assert np.array_equal(first[1], first[3])  # same index, same pixels
    fresh = pickle.loads(pickle.dumps(_source()))  # another process: empty caches
    for i, img in zip(order, first):
        assert img.shape == (64, 32, 3) and img.dtype == np.uint8
        assert np.array_equal(fresh.records("train").load_image(i), img)
    other_seed = _source(seed=1).records("train")
    assert not np.array_equal(other_seed.load_image(11), first[0])
    # records: pids without building them, slices are views, every pid has its images
    pids = [r.pid for r in train]
    assert pids == train.pids.tolist() == sorted(pids)
    assert set(pids) == set(range(12)) and len(train) == len(pids)
    view = train[10:20]
    assert len(view) == 10 and view[0] == train[10] and view.pids.tolist() == pids[10:20]
    assert np.array_equal(view.load_image(1), train.load_image(11))
    with pytest.raises(IndexError):
        train[len(train)]
    # an identity is seen by 2..6 cameras; camids stay inside the preset's cameras
    cams: dict[int, set[int]] = {}
    for r in train:
        cams.setdefault(r.pid, set()).add(r.camid)
    assert all(2 <= len(c) <= 6 for pid, c in cams.items() if pids.count(pid) >= 2)


def test_large_preset_costs_no_planning() -> None:
    """Hundreds of thousands of images: building the set and its PK sampler touches no
    image and no per-image plan."""
    import time

    cfg = load_config(None, ["data.dataset=synth_render", "data.render.preset=large", *FAST])
    t0 = time.process_time()
    ds = dataset_from_config(cfg.data)
    assert len(ds.train) > 250_000 and ds.num_train_pids == 4000
    loader = build_train_loader(cfg, ds.train)
    assert len(loader) == len(loader.sampler) // 8 > 0
    assert time.process_time() - t0 < 5.0  # CPU seconds: no per-record work


def test_validation_protocol_of_the_index_plan() -> None:
    source = _source()
    query, gallery = source.records("query"), source.records("gallery")
    q = [(r.pid, r.camid) for r in query]
    g = [(r.pid, r.camid) for r in gallery]
    assert len(set(q)) == len(q)  # one query per (identity, camera)
    assert {p for p, _ in q} == {p for p, _ in g} == set(range(1, 7))  # test ids, pid > 0
    for pid, cam in q:
        assert (pid, cam) in g  # a same-camera gallery image (removed by the protocol) ...
        assert any(p == pid and c != cam for p, c in g)  # ... and a cross-camera match
    # test people are not training people: other families, other cues
    plan = source.plan
    train_people = [plan.identity(1, p) for p in range(12)]
    assert all(plan.identity(2, p) not in train_people for p in range(6))


def test_on_the_fly_dataset_in_the_loaders() -> None:
    cfg = load_config(
        None, ["data.dataset=synth_render", "data.render.preset=tiny-wide", *FAST, "seed=3"]
    )
    ds = dataset_from_config(cfg.data)
    assert ds.name == "synth_render" and ds.num_train_pids == 12
    item = ImageDataset(ds.query, build_test_transforms(cfg.data))[2]
    assert item["image"].shape == (3, 64, 32) and item["pid"] == ds.query[2].pid
    loader = build_train_loader(cfg, ds.train)
    loader.set_epoch(0)
    a = next(iter(loader))
    loader.set_epoch(0)
    b = next(iter(loader))
    assert a["images"].shape == (8, 3, 64, 32) and torch.equal(a["images"], b["images"])
    # PK batches: 2 identities x 4 images
    assert sorted(torch.bincount(a["pids"]).tolist())[-2:] == [4, 4]


def test_variety_changes_the_images_the_knob_names() -> None:
    base = _source("gap-source-narrow")
    for knob in ("clothing_colours", "lighting", "blur", "crop_jitter"):
        varied = SynthRenderSource(
            SynthRenderConfig(preset="gap-source-narrow", **{knob: 1.0}), 64, 32
        )
        diff = [
            np.abs(
                varied.render("train", i).astype(int) - base.render("train", i).astype(int)
            ).mean()
            for i in range(0, 60, 20)
        ]
        assert max(diff) > 2.0, knob


# --------------------------------------------------------------------------- pretrain
def _pretrain(tmp: Path, *extra: str) -> int:
    return main(
        [
            "pretrain",
            "--backbone",
            "resnet18",
            "--preset",
            "tiny-wide",
            "--no-progress",
            *extra,
            *FAST,
        ]
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 2-epoch pretraining run with the backbone of epoch 1 exported too."""
    tmp = tmp_path_factory.mktemp("pretrain")
    out = tmp / "w.safetensors"
    assert _pretrain(tmp, "--epochs", "2", "--export-epochs", "1", "--out", str(out)) == 0
    return out


def test_writes_the_backbone_in_the_published_layout(pretrained: Path) -> None:
    tensors = load_file(str(pretrained))
    fresh = build_backbone("resnet18")
    assert set(tensors) == set(fresh.state_dict())  # torchvision keys, no prefix, nothing else
    assert "conv1.weight" in tensors and "layer1.0.conv1.weight" in tensors
    assert not any(k.startswith(("backbone.", "neck.", "classifier")) for k in tensors)
    report = load_pretrained(fresh, pretrained)
    assert report.missing == [] and report.unexpected == []
    loaded = build_backbone("resnet18", pretrained=pretrained).state_dict()
    for k, v in tensors.items():
        torch.testing.assert_close(loaded[k], v)
    # the run's final model carries the same backbone
    run = pretrained.with_name("w.run")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for k, v in backbone_tensors(state["model"]).items():
        torch.testing.assert_close(tensors[k], v)
    assert not list(pretrained.parent.glob(".*tmp*"))  # atomic writes leave nothing behind
    assert oct(pretrained.stat().st_mode & 0o077) != "0o0"  # a normal file, not 0600


def test_the_card(pretrained: Path) -> None:
    import hashlib

    import reidkit

    card = json.loads(card_path(pretrained).read_text())
    assert card["backbone"] == "resnet18" and card["preset"] == "tiny-wide"
    assert card["epochs"] == 2 and card["iterations"] == 4 and card["images_seen"] == 32
    assert card["input_size"] == [64, 32] and card["seed"] == 0 and card["render_seed"] == 0
    assert card["reidkit_version"] == reidkit.__version__ and card["init"] is None
    assert card["render"]["num_ids"] == 12 and card["render"]["textures"] == 1.0
    val = card["validation"]
    assert 0 < val["mAP"] <= 1 and 0 <= val["rank1"] <= 1 and val["epoch"] == 2
    metrics = json.loads((pretrained.with_name("w.run") / "metrics.json").read_text())
    assert val["mAP"] == metrics["final"]["mAP"]
    assert card["sha256"] == hashlib.sha256(pretrained.read_bytes()).hexdigest()
    e1 = json.loads(card_path(epoch_weights_path(pretrained, 1)).read_text())
    assert e1["epochs"] == 1 and e1["images_seen"] == 16 and e1["validation"]["epoch"] == 1


def test_any_method_starts_from_it(pretrained: Path) -> None:
    from reidkit.methods import build_method

    tensors = load_file(str(pretrained))
    # AGW inserts non-local blocks (new layers, not in the file) into ResNet-18's 2-block stages
    agw = ["model.non_local_layers.layer2=[1]", "model.non_local_layers.layer3=[1]"]
    for name, extra in (("bot", []), ("agw", agw), ("cama", [])):
        cfg = load_config(
            None,
            [
                f"model.name={name}",
                "model.backbone=resnet18",
                f"model.pretrained={pretrained}",
                *extra,
            ],
        )
        model = build_method(cfg, num_classes=4)
        own = {k: v for k, v in model.state_dict().items() if k.endswith("conv1.weight")}
        assert any(torch.equal(v, tensors["conv1.weight"]) for v in own.values()), name


def test_epoch_snapshot_is_the_shorter_run_and_resume_is_exact(
    pretrained: Path, tmp_path: Path
) -> None:
    # the backbone of epoch 1 of the 2-epoch run == the end of a 1-epoch run
    one = tmp_path / "one.safetensors"
    assert _pretrain(tmp_path, "--epochs", "1", "--out", str(one)) == 0
    snap = load_file(str(epoch_weights_path(pretrained, 1)))
    for k, v in load_file(str(one)).items():
        torch.testing.assert_close(snap[k], v, rtol=0, atol=0, msg=k)
    # stopped after epoch 1, resumed: the same final backbone as the uninterrupted run
    cut = tmp_path / "cut.safetensors"
    assert _pretrain(tmp_path, "--epochs", "2", "--stop-after", "1", "--out", str(cut)) == 0
    assert not cut.exists()  # the run is not finished: no final file yet
    assert _pretrain(tmp_path, "--epochs", "2", "--out", str(cut)) == 1  # run exists
    assert _pretrain(tmp_path, "--epochs", "2", "--resume", "--out", str(cut)) == 0
    full = load_file(str(pretrained))
    for k, v in load_file(str(cut)).items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0, msg=k)
    # a finished run resumed again only rewrites the file
    assert _pretrain(tmp_path, "--epochs", "2", "--resume", "--out", str(cut)) == 0


def test_init_from_imagenet_weights_and_refusals(tmp_path: Path, capsys) -> None:
    # an "ImageNet" file in torchvision's layout, classifier included (ignored)
    imagenet = build_backbone("resnet18", last_stride=2).state_dict()
    torch.manual_seed(1)
    imagenet = {
        k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in imagenet.items()
    }
    imagenet["fc.weight"], imagenet["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    init = tmp_path / "imagenet.pth"
    torch.save(imagenet, init)
    out = tmp_path / "syn.safetensors"
    args = ["--epochs", "1", "--init", str(init), "--out", str(out), "solver.iters_per_epoch=1"]
    assert _pretrain(tmp_path, *args) == 0
    card = json.loads(card_path(out).read_text())
    assert card["init"]["path"] == str(init) and len(card["init"]["sha256"]) == 64
    got = load_file(str(out))["conv1.weight"]
    # one warm-up step of Adam (lr 3.5e-5) moves each weight by at most ~lr
    assert (got - imagenet["conv1.weight"]).abs().max() < 1e-3
    # outputs never overwrite inputs; an existing output needs --overwrite
    same = tmp_path / "imagenet.safetensors"
    bad = ["--epochs", "1", "--out", str(out)]
    assert _pretrain(tmp_path, *bad) == 1
    assert "already exists" in capsys.readouterr().err
    assert _pretrain(tmp_path, "--epochs", "1", "--out", str(tmp_path / "w.pth")) == 1
    assert ".safetensors" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"conv1.weight": imagenet["conv1.weight"]}, str(same))
    assert _pretrain(tmp_path, "--epochs", "1", "--init", str(same), "--out", str(same)) == 1
    assert "never overwrite" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_under_ddp(tmp_path: Path) -> None:
    """Two gloo processes (torchrun): one backbone file, written by rank 0, equal to the
    final model of the run."""
    out = tmp_path / "ddp.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "reidkit.cli", "pretrain", "--backbone", "resnet18", "--preset", "tiny-wide"]
    cmd += ["--epochs", "1", "--out", str(out), "--no-progress", *FAST]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("2-process pretraining timed out:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-2000:] + stderr[-6000:]
    assert stdout.count(f"wrote {out}") == 1
    state = torch.load(out.with_name("ddp.run") / "checkpoints" / "last.pt", weights_only=True)
    tensors = load_file(str(out))
    for k, v in backbone_tensors(state["model"]).items():
        torch.testing.assert_close(tensors[k], v)
    card = json.loads(card_path(out).read_text())
    assert card["images_seen"] == 16  # the global batch: 2 iterations x 8 images


def test_commands_that_read_image_files_refuse_the_rendered_set_early() -> None:
    from reidkit.commands import _common

    cfg = load_config(None, ["data.dataset=synth_render", "data.render.preset=tiny-wide", *FAST])
    with pytest.raises(ValueError, match="renders its images on the fly.*reidkit synth"):
        _common.spread_records(cfg.data, "query", 3)
