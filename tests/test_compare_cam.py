"""Grad-CAM of several runs side by side (``reidkit.viz.compare_cam`` and ``reidkit
compare-gradcam``): the default layer is the map the head pools (checked against CAM, for
the Residual Attention Network whose last stage ends with a BN-ReLU tail), per-model
classes, and the command on tiny BoT runs (ResNet-50, SE-ResNet-50, RAN-56 at width 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_fakes import write_market_folder
from PIL import Image
from torch import nn

from reidkit.cli import main
from reidkit.config import dump_config, load_config
from reidkit.methods import build_method
from reidkit.viz.cam import class_activation_map
from reidkit.viz.compare_cam import (
    class_grad_cam,
    compare_grad_cam,
    comparison_rows,
    last_stage_layer,
    load_run,
    predicted_classes,
)
from reidkit.viz.grad_cam import class_logit, compute_grad_cam, normalize_maps
from reidkit.viz.grid import enlarge_images

torch.set_num_threads(1)
BACKBONES = ["resnet50", "se_resnet50", "resattnet56"]
NUM_IDS = 4


def _config(backbone: str, root: Path | None = None, run: Path | None = None):
    over = [
        "model.name=bot",
        f"model.backbone={backbone}",
        "model.backbone_options={width: 4}",
        "model.pretrained=null",
        "data.dataset=market1501",
        f"data.root={root or 'data'}",
        "data.height=64",
        "data.width=32",
    ]
    if run is not None:
        over.append(f"output_dir={run}")
    return load_config(None, over)


def _tiny_model(backbone: str, seed: int = 0, cfg=None) -> nn.Module:
    torch.manual_seed(seed)
    model = build_method(cfg or _config(backbone), NUM_IDS)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN is not the identity
        model.train()
        for s in range(2):
            model({"images": torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(s))})
        model.neck.classifier.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return model.eval()


@pytest.fixture(scope="module")
def ran() -> nn.Module:
    return _tiny_model("resattnet56")


def test_last_stage_layer() -> None:
    assert last_stage_layer(_tiny_model("resnet50")) == "backbone.layer4"
    assert (
        last_stage_layer(
            build_method(
                load_config(
                    None, ["model.name=bot", "model.backbone=osnet_x0_25", "model.pretrained=null"]
                ),
                3,
            )
        )
        == "backbone.conv5"
    )
    vit = build_method(
        load_config(
            None, ["model.name=bot", "model.backbone=vit_small_patch16", "model.pretrained=null"]
        ),
        3,
    )
    with pytest.raises(ValueError, match="not \\(B, C, h, w\\) maps"):
        last_stage_layer(vit)
    with pytest.raises(ValueError, match="no backbone with named stages"):
        last_stage_layer(nn.Linear(2, 2))


def test_default_layer_is_the_map_the_head_pools(ran: nn.Module) -> None:
    """RAN's last stage ends with BN-ReLU (``norm_out``); the default layer is that tail, so
    with GAP -> BN1d -> Linear the signed Grad-CAM is CAM / (h w) up to a constant per image
    (Selvaraju et al., Sec. 3.1). The stage's own output (before the tail) does not satisfy
    it: the tail's ReLU sits between it and the pooling."""
    assert last_stage_layer(ran) == "backbone.norm_out"
    images = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 3, 1])
    cam = class_activation_map(ran, images, target, upsample=False)  # (B, h, w), independent
    h, w = cam.shape[-2:]

    def offset(layer: str) -> torch.Tensor:
        raw = compute_grad_cam(
            ran, images, layer, class_logit(target), forward=ran.forward_train, relu=False
        ).raw
        return cam - h * w * raw

    good = offset(last_stage_layer(ran))
    torch.testing.assert_close(
        good, good.mean(dim=(1, 2), keepdim=True).expand_as(good), rtol=1e-4, atol=1e-4
    )
    bad = offset("backbone.layer4")
    assert float((bad - bad.mean(dim=(1, 2), keepdim=True)).abs().max()) > 1e-2
    # class_grad_cam = that map, ReLU'd and scaled by its maximum; scores are the logits
    res = class_grad_cam(ran, images, classes=target)
    raw = compute_grad_cam(
        ran, images, "backbone.norm_out", class_logit(target), forward=ran.forward_train
    ).raw
    torch.testing.assert_close(res.maps, normalize_maps(raw))
    with torch.no_grad():
        logits = ran.forward_train(images)["logits"]
    torch.testing.assert_close(res.scores, logits.gather(1, target[:, None]).squeeze(1))


def test_compare_grad_cam_classes(ran: nn.Module) -> None:
    r50 = _tiny_model("resnet50", seed=1)
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(5))
    cams, used = compare_grad_cam([r50, ran], images)
    assert [c.maps.shape for c in cams] == [(2, 4, 2), (2, 4, 2)]
    assert torch.equal(used[0], predicted_classes(r50, images))
    assert torch.equal(used[1], predicted_classes(ran, images))
    # one class for all, and per-model classes / batches / layers
    cams2, used2 = compare_grad_cam([r50, ran], [images, images], classes=2)
    assert all(torch.equal(u, torch.tensor([2, 2])) for u in used2)
    torch.testing.assert_close(cams2[1].maps, class_grad_cam(ran, images, classes=2).maps)
    cams3, _ = compare_grad_cam(
        [r50, ran], images, layers=["backbone.layer3", None], classes=[None, torch.tensor([1, 0])]
    )
    torch.testing.assert_close(cams3[0].maps, class_grad_cam(r50, images, "backbone.layer3").maps)
    with pytest.raises(ValueError, match="2 layers for 1 models"):
        compare_grad_cam([r50], images, layers=[None, None])
    with pytest.raises(ValueError, match="same images"):
        compare_grad_cam([r50, ran], [images, images[:1]])
    rows = comparison_rows(
        enlarge_images(torch.zeros(2, 64, 32, 3, dtype=torch.uint8).numpy()), [c.maps for c in cams]
    )
    assert len(rows) == 2 and len(rows[0]) == 3 and rows[0][1].shape == (192, 96, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[Path]]:
    base = tmp_path_factory.mktemp("cmp")
    root = write_market_folder(base / "data", num_ids=NUM_IDS, size=(64, 32))
    folders = []
    for i, bb in enumerate(BACKBONES):
        run = base / "runs" / bb
        cfg = _config(bb, root, run)
        model = _tiny_model(bb, seed=i, cfg=cfg)
        (run / "checkpoints").mkdir(parents=True)
        dump_config(cfg, run / "config.yaml")
        torch.save(model.state_dict(), run / "checkpoints" / "best.pt")
        folders.append(run)
    return root, folders


def test_command_writes_grid_and_report(runs, tmp_path, capsys) -> None:
    root, folders = runs
    out, report = tmp_path / "fig3.png", tmp_path / "fig3.json"
    argv = ["compare-gradcam", "--runs", *map(str, folders), "--split", "query", "--num", "3"]
    assert main([*argv, "--out", str(out), "--json", str(report), "--min-width", "64"]) == 0
    text = capsys.readouterr().out
    assert "resattnet56: backbone.norm_out (4x2 map)" in text and "top-0.2 IoU" in text
    data = json.loads(report.read_text())
    assert data["labels"] == BACKBONES
    assert data["layers"] == ["backbone.layer4", "backbone.layer4", "backbone.norm_out"]
    overlap = torch.tensor(data["overlap"])
    assert overlap.shape == (3, 3) and torch.allclose(overlap.diagonal(), torch.ones(3))
    assert torch.allclose(overlap, overlap.T)
    # images where a map is all zero are left out of that pair's overlap
    zero = data["all_zero_maps"]
    assert set(zero) == set(BACKBONES)
    for i, a in enumerate(BACKBONES):
        for j, b in enumerate(BACKBONES):
            assert data["overlap_images"][i][j] == 3 - len(set(zero[a]) | set(zero[b]))
    # the classes explained are each model's own prediction on the query images
    query = sorted((root / "Market-1501-v15.09.15" / "query").glob("*.jpg"))
    assert len(data["images"]) == 3 and set(data["images"]) <= {p.name for p in query}
    lr = load_run(folders[2])
    from reidkit.commands._common import read_images

    paths = [root / "Market-1501-v15.09.15" / "query" / n for n in data["images"]]
    images = read_images(lr.cfg.data, [str(p) for p in paths])
    assert data["classes"]["resattnet56"] == predicted_classes(lr.model, images).tolist()
    # 3 rows x (image + 3 runs); images enlarged 2x to 128x64
    with Image.open(out) as img:
        assert img.width > 4 * 64 and img.height > 3 * 128


def test_command_options_and_errors(runs, tmp_path, capsys) -> None:
    root, folders = runs
    files = sorted((root / "Market-1501-v15.09.15" / "bounding_box_test").glob("*.jpg"))[:2]
    out = tmp_path / "g.png"
    base = ["compare-gradcam", "--runs", str(folders[0]), str(folders[2]), "--out", str(out)]
    argv = [*base, "--images", *map(str, files), "--target", "2", "--labels", "R50", "RAN"]
    assert main([*argv, "--json", str(tmp_path / "g.json")]) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["classes"] == {"R50": [2, 2], "RAN": [2, 2]} and out.is_file()
    # training labels on the train split
    assert main([*base, "--split", "train", "--num", "2", "--target", "label"]) == 0
    capsys.readouterr()
    assert main([*base, "--split", "query", "--target", "label"]) == 1
    assert "--target label needs --split train" in capsys.readouterr().err
    assert main([*base, "--split", "query", "--labels", "only-one"]) == 1
    assert "--labels: 1 labels for 2 runs" in capsys.readouterr().err
    assert main([*base, "--images", str(tmp_path / "nope.jpg")]) == 1
    assert "file not found" in capsys.readouterr().err
    assert (
        main(["compare-gradcam", "--runs", str(tmp_path), "--split", "query", "--out", str(out)])
        == 1
    )
    assert "no config.yaml" in capsys.readouterr().err


def test_overlap_skips_all_zero_maps() -> None:
    from reidkit.commands.compare_gradcam import overlap_of_nonzero_maps

    # 2 runs x 3 images of 2x2 maps, top-1 cell; run 1's map of image 2 is all zero
    a = torch.tensor([[[1.0, 0], [0, 0]], [[0, 1.0], [0, 0]], [[0, 0], [0, 1.0]]])
    b = torch.tensor([[[0.9, 0], [0, 0.1]], [[1.0, 0], [0, 0]], [[0, 0], [0, 0]]])
    maps = torch.stack([a, b])
    empty = maps.flatten(2).amax(dim=2) <= 0
    assert empty.tolist() == [[False, False, False], [False, False, True]]
    mat, counts = overlap_of_nonzero_maps(maps, empty, 1)
    # image 0: same cell (IoU 1), image 1: different cells (0), image 2 left out for the pair
    torch.testing.assert_close(mat, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    assert counts.tolist() == [[3, 2], [2, 2]]
    mat, counts = overlap_of_nonzero_maps(maps[:, 2:], empty[:, 2:], 1)
    assert torch.isnan(mat[0, 1]) and counts[0, 1] == 0 and mat[0, 0] == 1
