"""reidkit.api: config spellings, Run / train / evaluate, and FeatureExtractor against the
engine's extractor (every input kind), a naive flip + normalise computation and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_fakes import fake_config, write_market_folder
from PIL import Image

import reidkit.api as rk
from reidkit.config import ConfigError, load_config
from reidkit.data.loader import build_test_loader
from reidkit.data.records import ImageRecord
from reidkit.data.transforms import build_test_transforms
from reidkit.engine import extract_features, load_model
from reidkit.engine.checkpoint import atomic_save
from reidkit.methods import build_method

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.backbone": "resnet18", "data.height": 64, "data.width": 32, "data.num_workers": 0}


def tiny_config(**over):
    items = {**TINY, **over}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _randomise_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics, so post_bn differs from pre_bn and eval BN matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_method(cfg, 5)
    _randomise_bn(model)
    path = tmp_path_factory.mktemp("w") / "model.pt"
    atomic_save({"model": model.state_dict(), "num_classes": 5}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """PNG files (lossless, so file pixels == array pixels) of mixed sizes."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 20), (64, 32), (97, 41), (30, 30)]):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def engine_features(cfg, weights, paths) -> torch.Tensor:
    """What `reidkit eval` computes: the test loader over records + extract_features."""
    model = load_model(cfg, weights)
    records = [ImageRecord(str(p), 0, 0) for p in paths]
    fs = extract_features(
        model,
        build_test_loader(cfg, records),
        "cpu",
        flip=cfg.test.flip,
        feature=cfg.test.feature,
        normalize=cfg.test.normalize,
    )
    return fs.feats


# ----------------------------------------------------------------------- config()
def test_config_override_spellings_agree():
    path = ROOT / "configs/synth/cge_bot.yaml"
    a = rk.config(path, ["solver.lr=0.002", "data.height=96", "model.cge.num_stripes=4"])
    b = rk.config(
        path, {"solver.lr": 0.002, "data": {"height": 96}, "model.cge": {"num_stripes": 4}}
    )
    c = rk.config(str(path), solver__lr=0.002, data__height=96, model={"cge": {"num_stripes": 4}})
    assert a == b == c
    assert (a.solver.lr, a.data.height, a.model.cge.num_stripes) == (0.002, 96, 4)
    assert a.model.name == "cge" and a.data.width == 48  # from the YAML chain
    # a dict-valued field is a value, not a section: replaced as a whole
    d = rk.config(None, model__non_local_layers={"layer3": [1]})
    assert d.model.non_local_layers == {"layer3": [1]}


def test_config_from_config_copies_and_keeps_presets_applicable():
    base = rk.config(None, model__name="bot", model__backbone="resnet18")
    agw = rk.config(base, model__name="agw")
    assert base.model.name == "bot"  # not modified
    assert agw.model.name == "agw" and agw.model.backbone == "resnet18"
    # pooling was never set explicitly, so the agw preset (GeM) applies when loading
    assert agw.model.pooling == "gem" and agw.loss.metric == "wrt"
    explicit = rk.config(base, model__name="agw", model__pooling="avg")
    assert explicit.model.pooling == "avg" and explicit.loss.metric == "wrt"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="solver.lrr.*did you mean 'solver.lr'"):
        rk.config(None, solver__lrr=0.1)
    with pytest.raises(ConfigError, match="not found"):
        rk.config("no/such/config.yaml")


# -------------------------------------------------------------- FeatureExtractor
def test_every_input_kind_matches_the_engine(weights, images):
    cfg = tiny_config()
    ref = engine_features(cfg, weights, images)
    ex = rk.FeatureExtractor(config=cfg, weights=weights, device="cpu")
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    inputs = {
        "str paths": [str(p) for p in images],
        "Path paths": list(images),
        "PIL": [Image.open(p) for p in images],
        "arrays": arrays,
        "uint8 (3,H,W) tensors": [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays],
        "mixed": [
            str(images[0]),
            Image.open(images[1]),
            arrays[2],
            torch.from_numpy(arrays[3].copy()).permute(2, 0, 1),
        ],
    }
    for kind, items in inputs.items():
        out = ex(items)
        assert out.shape == ref.shape == (4, 512), kind
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6, msg=kind)
    torch.testing.assert_close(ex(str(images[2])), ref[2:3], rtol=0, atol=1e-6)  # single image
    torch.testing.assert_close(ex(arrays[1]), ref[1:2], rtol=0, atol=1e-6)
    # small batches give the same features (no dependence on batch composition)
    small = rk.FeatureExtractor(
        config=cfg, weights=weights, device="cpu", batch_size=3, num_workers=2
    )
    torch.testing.assert_close(small(list(images)), ref, rtol=0, atol=1e-6)


def test_batch_tensor_and_array_inputs(weights, images):
    cfg = tiny_config()
    ex = rk.FeatureExtractor(config=cfg, weights=weights, device="cpu", batch_size=2)
    same_size = [images[1]] * 2 + [images[0]]
    ref = engine_features(cfg, weights, same_size)
    arrays = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB").resize((32, 64), Image.NEAREST))
            for p in same_size
        ]
    )
    # images[1] is already 64x32; the 3rd is a resized copy, recompute its reference
    Image.fromarray(arrays[2]).save(images[0].parent / "resized.png")
    ref[2] = engine_features(cfg, weights, [images[0].parent / "resized.png"])[0]
    batch_u8 = torch.from_numpy(arrays).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    torch.testing.assert_close(ex(batch_u8), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ex(arrays), ref, rtol=0, atol=1e-6)  # (B, H, W, 3) uint8
    # already preprocessed tensors (a test-loader batch): passed to the model as they are
    normalised = build_test_transforms(cfg.data)(batch_u8)
    torch.testing.assert_close(ex(normalised, normalized=True), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ex(list(normalised), normalized=True), ref, rtol=0, atol=1e-6)
    # float RGB in [0, 1]: the same image up to the uint8 -> float scaling
    torch.testing.assert_close(ex(batch_u8.float() / 255), ref, rtol=0, atol=1e-4)


def test_flip_prebn_and_normalisation_against_a_naive_computation(weights, images):
    cfg = tiny_config(**{"test.flip": True, "test.feature": "pre_bn"})
    ex = rk.FeatureExtractor(config=cfg, weights=weights, device="cpu")
    out = ex(list(images))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(images)))
    model = load_model(cfg, weights)
    t = build_test_transforms(cfg.data)
    expected = []
    with torch.no_grad():
        for p in images:  # one image at a time, the flip done on its own
            x = t(Image.open(p).convert("RGB"))[None]
            f = (
                model.forward_features(x)["pre_bn"] + model.forward_features(x.flip(3))["pre_bn"]
            ) / 2
            expected.append(f[0] / f[0].norm())
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, engine_features(cfg, weights, images), rtol=0, atol=1e-6)
    raw = rk.FeatureExtractor(
        config=cfg, weights=weights, device="cpu", normalize=False, flip=False
    )(images[:1])
    with torch.no_grad():
        direct = model.forward_features(t(Image.open(images[0]).convert("RGB"))[None])["pre_bn"]
    torch.testing.assert_close(raw, direct, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(1))
    assert ex.dim == 512 and ex([]).shape == (0, 512)


def test_extractor_errors(weights, images, tmp_path):
    cfg = tiny_config()
    missing = tmp_path / "nope" / "best.pt"
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nope/best\.pt"):
        rk.FeatureExtractor(config=cfg, weights=missing)
    with pytest.raises(FileNotFoundError, match="without checkpoints/best.pt"):
        rk.FeatureExtractor(config=cfg, weights=tmp_path)
    with pytest.raises(ValueError, match="weights=... is required"):
        rk.FeatureExtractor(config=cfg)
    ex = rk.FeatureExtractor(config=cfg, weights=weights, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"image 1: file not found: .*ghost\.jpg"):
        ex([images[0], tmp_path / "ghost.jpg"])
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*uint8.*float32"):
        ex([np.zeros((8, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="normalized=True"):
        ex(torch.randn(2, 3, 64, 32))  # float values outside [0, 1] without normalized=True
    with pytest.raises(ValueError, match=r"model input .* \(64, 32\)"):
        ex(torch.randn(2, 3, 32, 32), normalized=True)
    with pytest.raises(TypeError, match="unsupported type int"):
        ex([3])
    # weights that do not fit the configured model: the engine's error names the keys
    with pytest.raises(ValueError, match="do not match model"):
        rk.FeatureExtractor(config=tiny_config(**{"model.backbone": "resnet34"}), weights=weights)


# ------------------------------------------------------------- train / evaluate
def test_train_run_evaluate_and_extractor_from_run(tmp_path):
    root = write_market_folder(tmp_path / "data", num_ids=4, per_cam=2)
    cfg = fake_config(root, tmp_path / "run", **{"solver.max_epochs": 1, "test.eval_period": 1})
    run = rk.train(cfg, progress=False)
    assert isinstance(run, rk.Run) and run.dir == tmp_path / "run"
    assert run.checkpoint() == run.dir / "checkpoints/best.pt"
    assert set(run.metrics) >= {"final", "best", "epochs"} and run.metrics["epochs"] == 1
    assert any(r.get("type") == "eval" for r in run.log)
    assert run.config.model.name == cfg.model.name
    assert not run.model().training
    # evaluate(run) reproduces the trainer's final evaluation
    result = rk.evaluate(run, device="cpu")
    for key in ("mAP", "rank1"):
        assert result.metrics[key] == pytest.approx(run.metrics["final"][key], abs=1e-6)
    # a config: weights default to its output_dir run; a YAML path works the same
    by_cfg = rk.evaluate(cfg, device="cpu")
    assert by_cfg.metrics == pytest.approx(result.metrics)
    # the extractor finds the config in the run folder (weights = the run folder)
    paths = result.query.paths
    from_run = rk.FeatureExtractor(weights=run.dir, device="cpu")(paths)
    torch.testing.assert_close(from_run, result.query.feats, rtol=0, atol=1e-6)
    from_ckpt = rk.FeatureExtractor(weights=run.checkpoint("last"), device="cpu")(paths)
    torch.testing.assert_close(from_ckpt, result.query.feats, rtol=0, atol=1e-6)
    assert rk.load_run(run.dir).metrics == run.metrics
    # ONNX export of the run: onnxruntime on the transformed query images == the features
    ort = pytest.importorskip("onnxruntime")
    exported = run.export(tmp_path / "run.onnx", dynamic_batch=True)
    x = torch.stack([build_test_transforms(cfg.data)(Image.open(p).convert("RGB")) for p in paths])
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    onnx_feats = torch.from_numpy(sess.run(["features"], {"images": x.numpy()})[0])
    torch.testing.assert_close(onnx_feats, result.query.feats, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no weights given and output_dir .*nowhere"):
        rk.evaluate(rk.config(cfg, output_dir=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        rk.load_run(tmp_path)


def test_import_reidkit_is_lazy():
    code = (
        "import sys, reidkit\n"
        "assert 'torch' not in sys.modules, 'import reidkit must not import torch'\n"
        "assert 'FeatureExtractor' in dir(reidkit) and 'reidkit.api' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    import reidkit

    assert reidkit.FeatureExtractor is rk.FeatureExtractor and reidkit.train is rk.train
    assert reidkit.api is rk and reidkit.load_config is load_config
    assert set(reidkit.__all__) - {"__version__"} == set(reidkit._LAZY)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        reidkit.nope  # noqa: B018


def test_similarity_is_cosine():
    a, b = torch.randn(3, 8), torch.randn(5, 8)
    sim = rk.FeatureExtractor.similarity(a, b)
    torch.testing.assert_close(sim, F.cosine_similarity(a[:, None], b[None], dim=2))
