"""ONNX export: onnxruntime vs PyTorch round trips (dynamic and static batch, flip,
pre-BN, GeM + non-local, CAMA, CGE), the graph's inputs / metadata, the mismatch check and
the ``reidkit export`` command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import reidkit.api as rk  # noqa: E402
from reidkit.cli import main as cli_main  # noqa: E402
from reidkit.config import load_config  # noqa: E402
from reidkit.data.transforms import build_test_transforms  # noqa: E402
from reidkit.engine.checkpoint import atomic_save  # noqa: E402
from reidkit.export import (  # noqa: E402
    InferenceModel,
    ONNXMismatchError,
    check_onnx,
    export_from_config,
    export_onnx,
    format_size,
)
from reidkit.methods import build_method  # noqa: E402

torch.set_num_threads(1)

TINY = ["model.backbone=resnet18", "data.height=64", "data.width=32", "data.num_workers=0"]


def tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


def make_weights(cfg, path: Path, num_classes: int = 4) -> Path:
    torch.manual_seed(0)
    model = build_method(cfg, num_classes)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    atomic_save({"model": model.state_dict(), "num_classes": num_classes}, path)
    return path


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])


def test_dynamic_batch_round_trip_matches_the_feature_extractor(tmp_path):
    cfg = tiny()
    weights = make_weights(cfg, tmp_path / "w.pt")
    out = tmp_path / "sub" / "bot.onnx"
    result = export_from_config(cfg, weights, out, dynamic_batch=True)
    assert out.is_file() and result.size_bytes == out.stat().st_size
    assert result.opset == 17 and result.dim == 512 and result.checked_batches == [1, 3]
    assert result.rel_diff is not None and result.rel_diff <= 1e-4
    model = onnx.load(str(out))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 64, 32]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["reidkit.input_size"] == "64x32" and meta["reidkit.method"] == "bot"
    assert meta["reidkit.feature"] == "post_bn" and meta["reidkit.normalize"] == "true"
    assert meta["reidkit.mean"] == "0.485,0.456,0.406"
    # real images through the test transforms: ONNX == the Python extractor, batch 1 and 3
    rng = np.random.default_rng(0)
    pils = [
        Image.fromarray(rng.integers(0, 256, (50 + 7 * i, 25, 3), dtype=np.uint8)) for i in range(3)
    ]
    x = torch.stack([build_test_transforms(cfg.data)(p) for p in pils])
    ex = rk.FeatureExtractor(config=cfg, weights=weights, device="cpu")
    ref = ex(pils)
    torch.testing.assert_close(run_onnx(out, x), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(run_onnx(out, x[1:2]), ref[1:2], rtol=0, atol=1e-5)
    assert "max abs diff" in result.summary() and "(batch, 3, 64, 32)" in result.summary()


def test_static_batch_graph_and_flip_prebn(tmp_path):
    cfg = tiny("test.flip=true", "test.feature=pre_bn")
    weights = make_weights(cfg, tmp_path / "w.pt")
    out = tmp_path / "flip.onnx"
    result = export_from_config(cfg, weights, out, batch_size=2)
    assert result.checked_batches == [2] and not result.dynamic_batch
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 64, 32]
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(5))
    model = rk.FeatureExtractor(config=cfg, weights=weights, device="cpu").model
    with torch.no_grad():  # naive: two separate forwards, average, normalise
        f = (model.forward_features(x)["pre_bn"] + model.forward_features(x.flip(3))["pre_bn"]) / 2
    torch.testing.assert_close(run_onnx(out, x), F.normalize(f, dim=1), rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        run_onnx(out, torch.randn(3, 3, 64, 32))  # the static graph takes exactly 2


@pytest.mark.parametrize(
    "extra",
    [
        ("model.name=agw", "model.non_local_layers={layer2: [1], layer3: [1]}"),  # GeM + non-local
        ("model.name=cama",),
        ("model.name=cge",),
        ("model.name=ide", "test.normalize=false"),
    ],
    ids=["agw", "cama", "cge", "ide-raw"],
)
def test_methods_export_and_agree(tmp_path, extra):
    cfg = tiny(*extra)
    torch.manual_seed(0)
    model = build_method(cfg, 4).eval()
    out = tmp_path / "m.onnx"
    result = export_onnx(
        model,
        out,
        (64, 32),
        feature=cfg.test.feature,
        normalize=cfg.test.normalize,
        dynamic_batch=True,
    )
    assert result.rel_diff <= 1e-4
    x = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.encode({"images": x})[cfg.test.feature]  # the method's own test feature
    if cfg.test.normalize:
        ref = F.normalize(ref, dim=1)
    got = run_onnx(out, x)
    assert got.shape == ref.shape == (3, result.dim)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert model.training is False and next(model.parameters()).device.type == "cpu"


def test_mismatch_is_detected(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    model = build_method(cfg, 4).eval()
    out = tmp_path / "m.onnx"
    export_onnx(model, out, (64, 32), dynamic_batch=True, verify=False)
    other = build_method(cfg, 4).eval()  # different random weights
    with pytest.raises(ONNXMismatchError, match="relative"):
        check_onnx(out, InferenceModel(other), [1], (64, 32))
    # a graph with another output width is reported by shape
    wide = InferenceModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 16)))
    narrow = InferenceModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 8)))
    export_onnx(wide, tmp_path / "wide.onnx", (6, 3), dynamic_batch=True)
    with pytest.raises(ONNXMismatchError, match=r"output \(2, 16\) != torch \(2, 8\)"):
        check_onnx(tmp_path / "wide.onnx", narrow, [2], (6, 3))


def test_export_errors(tmp_path):
    cfg = tiny()
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*missing\.pt"):
        export_from_config(cfg, tmp_path / "missing.pt", tmp_path / "x.onnx")
    model = build_method(cfg, 2)
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "x.onnx", (64, 32), exporter="tflite")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, tmp_path / "x.onnx", (64,))  # type: ignore[arg-type]
    if importlib.util.find_spec("onnxscript") is None:
        with pytest.raises(ImportError, match="onnxscript"):
            export_onnx(model, tmp_path / "x.onnx", (64, 32), exporter="dynamo")
    assert format_size(1536) == "1.5 KiB" and format_size(100) == "100 B"
    assert format_size(3 * 1024**2) == "3.0 MiB"


def test_cli_export(tmp_path, capsys):
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text("model:\n  backbone: resnet18\ndata:\n  height: 64\n  width: 32\n")
    cfg = load_config(yaml)
    weights = make_weights(cfg, tmp_path / "w.pt")
    out = tmp_path / "cli.onnx"
    rc = cli_main(
        ["export", "-c", str(yaml), "--weights", str(weights), "--out", str(out), "--dynamic-batch"]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "max abs diff" in printed and "MiB" in printed and "batch 1, 3" in printed
    rc = cli_main(
        ["export", "-c", str(yaml), "--weights", str(tmp_path / "nope.pt"), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "--weights: file not found" in err and "nope.pt" in err
