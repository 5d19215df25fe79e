"""`reidkit viz gradcam`, `reidkit viz relation`, `reidkit mismatches` and the report's
Grad-CAM view / IANet receptive-field section, end to end on a generated tiny synthetic
set with saved (untrained) tiny-width SCR and IANet weights; the report page in Chromium."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch
from chromium_cdp import Chromium
from PIL import Image

import reidkit.methods.baseline as baseline_mod
import reidkit.models as models_pkg
from reidkit.cli import main
from reidkit.config import load_config
from reidkit.methods import build_method
from reidkit.models import build_backbone

torch.set_num_threads(1)


def _tiny(model_cfg):
    return build_backbone("resnet18", last_stride=model_cfg.last_stride, width=8)


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch):
    monkeypatch.setattr(models_pkg, "backbone_from_config", _tiny)
    monkeypatch.setattr(baseline_mod, "backbone_from_config", _tiny)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from reidkit.data.synth import generate

    root = tmp_path_factory.mktemp("viz")
    generate(root / "synth-tiny", preset="tiny", seed=0, progress=False)
    data = (
        f"data: {{dataset: synth, root: '{root}', synth_preset: tiny, height: 64, width: 32, "
        "num_workers: 0, test_batch_size: 64}\ndevice: cpu\n"
    )
    out = {"root": root}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models_pkg, "backbone_from_config", _tiny)
        mp.setattr(baseline_mod, "backbone_from_config", _tiny)
        for name, extra in (("scr", "test: {flip: false}\n"), ("ianet", "")):
            cfg_path = root / f"{name}.yaml"
            cfg_path.write_text(f"model: {{name: {name}, backbone: resnet18}}\n{data}{extra}")
            torch.manual_seed(0)
            model = build_method(load_config(cfg_path), 24)
            if name == "ianet":  # a non-trivial relation: open the zero-initialised blocks
                with torch.no_grad():
                    for block in model.ia_blocks().values():
                        block.spatial.bn.weight.fill_(1.0)
            weights = root / f"{name}.pth"
            torch.save(model.state_dict(), weights)
            out[name] = (str(cfg_path), str(weights))
    return out


def _run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_gradcam_parts_grid_and_overlap(setup, tmp_path, capsys) -> None:
    cfg, weights = setup["scr"]
    out, js = tmp_path / "parts.png", tmp_path / "parts.json"
    parts = ["part:p2_s1", "part:p2_s2", "part:p2_c1", "part:p2_c2"]
    rc, text = _run(
        ["viz", "gradcam", "-c", cfg, "--weights", weights, "--split", "query", "--num", "10",
         "--max-rows", "3", *[a for p in parts for a in ("--target", p)], "--out", str(out),
         "--json", str(js)],
        capsys,
    )  # fmt: skip
    assert rc == 0, text
    assert "mean top-0.2 IoU" in text and "p2_c2" in text
    report = json.loads(js.read_text())
    mat = np.array(report["overlap"])
    assert mat.shape == (4, 4) and np.allclose(np.diag(mat), 1.0)
    assert np.allclose(mat, mat.T) and ((mat >= 0) & (mat <= 1)).all()
    assert report["num_images"] == 10 and report["map_size"] == [4, 2]
    assert set(report["layers"].values()) == {"branches.1.stages.1"}
    img = Image.open(out)
    assert img.width > 5 * 32 and img.height > 3 * 64  # 3 rows, image + 4 overlays
    # files as input, class target, an explicit layer
    files = sorted((setup["root"] / "synth-tiny" / "query").glob("*.jpg"))[:2]
    rc, text = _run(
        ["viz", "gradcam", "-c", cfg, "--weights", weights, "--images", *map(str, files),
         "--target", "class", "--layer", "branches.0", "--out", str(tmp_path / "c.png")],
        capsys,
    )  # fmt: skip
    assert rc == 0 and (tmp_path / "c.png").is_file(), text


def test_gradcam_pair_and_errors(setup, tmp_path, capsys) -> None:
    cfg, weights = setup["ianet"]
    rc, text = _run(
        ["viz", "gradcam", "-c", cfg, "--weights", weights, "--split", "query", "--num", "3",
         "--target", "pair", "--out", str(tmp_path / "pair.png")],
        capsys,
    )  # fmt: skip
    assert rc == 0 and "cosine similarity of 'post_bn'" in text, text
    assert (tmp_path / "pair.png").is_file()
    bad = [
        (["--target", "parts:p1"], "expected class"),
        (["--target", "pair", "--target", "class"], "cannot be combined"),
        (["--target", "part:p9"], "no part classifiers"),
    ]
    for extra, message in bad:
        rc, text = _run(
            ["viz", "gradcam", "-c", cfg, "--weights", weights, "--split", "query", "--num", "2",
             *extra, "--out", str(tmp_path / "x.png")],
            capsys,
        )  # fmt: skip
        assert rc == 1 and message in text, (extra, text)
    rc, text = _run(
        ["viz", "gradcam", "-c", cfg, "--weights", weights, "--out", str(tmp_path / "x.png")],
        capsys,
    )
    assert rc == 1 and "--images" in text


def test_relation_command(setup, tmp_path, capsys) -> None:
    cfg, weights = setup["ianet"]
    out = tmp_path / "fields.png"
    rc, text = _run(
        ["viz", "relation", "-c", cfg, "--weights", weights, "--split", "query", "--num", "2",
         "--positions", "0.2,0.5", "0.7,0.5", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert rc == 0, text
    assert "backbone.ia_layer2.0.spatial, backbone.ia_layer3.0.spatial" in text
    img = Image.open(out)
    assert img.height > 4 * 64  # 2 blocks x 2 images
    scr_cfg, scr_w = setup["scr"]
    rc, text = _run(
        ["viz", "relation", "-c", scr_cfg, "--weights", scr_w, "--split", "query", "--num", "1",
         "--out", str(tmp_path / "y.png")],
        capsys,
    )  # fmt: skip
    assert rc == 1 and "no spatial IA block" in text


def test_mismatches_command_with_tags(setup, tmp_path, capsys) -> None:
    cfg, weights = setup["scr"]
    out = tmp_path / "mm"
    rc, text = _run(["mismatches", "-c", cfg, "--weights", weights, "--out", str(out), "--no-progress"], capsys)  # fmt: skip
    assert rc == 0, text
    m = re.search(r"(\d+) rank-1 mismatches among (\d+) valid queries", text)
    assert m and int(m.group(1)) > 0
    assert "look-alike family" in text  # the synthetic set's families are reported
    page = (out / "mismatches.html").read_text()
    keys = [html.unescape(k) for k in re.findall(r"class='item[^']*' data-key='([^']*)'", page)]
    assert len(keys) == int(m.group(1))
    tags = {
        "format": "reidkit-mismatch-tags",
        "version": 1,
        "tags": {keys[0]: {"tag": "similar_clothes", "updated": 1}},
    }
    tag_file = tmp_path / "tags.json"
    tag_file.write_text(json.dumps(tags))
    rc, text = _run(
        ["mismatches", "-c", cfg, "--weights", weights, "--out", str(tmp_path / "mm2"),
         "--tags", str(tag_file), "--no-progress"],
        capsys,
    )  # fmt: skip
    assert rc == 0, text
    assert re.search(r"\s1\s+very similar clothes", text)
    assert re.search(rf"\s{len(keys) - 1}\s+untagged", text)


def test_report_gradcam_view_and_relation_section(setup, tmp_path, capsys) -> None:
    cfg, weights = setup["ianet"]
    out = tmp_path / "rep"
    rc, text = _run(
        ["report", "-c", cfg, "--weights", weights, "--out", str(out), "--queries", "2",
         "--topk", "3", "--gradcam", "pair", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert rc == 0, text
    page = (out / "report.html").read_text()
    assert page.count("data-view='gradcam'") == 2 * 4  # 2 rows x (query + 3 gallery)
    assert "IANet receptive fields" in page and "backbone.ia_layer3.0" in page
    scr_cfg, scr_w = setup["scr"]
    rc, text = _run(
        ["report", "-c", scr_cfg, "--weights", scr_w, "--out", str(tmp_path / "rep2"),
         "--queries", "2", "--topk", "3", "--gradcam", "part:p3_c1", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert rc == 0, text
    page2 = (tmp_path / "rep2" / "report.html").read_text()
    assert "Grad-CAM (part p3_c1)" in page2 and "IANet receptive fields" not in page2
    assert page2.count("data-view='branch3'") == 2 * 4  # SCR's three branch RAMs

    # in the browser: the Grad-CAM button shows the Grad-CAM overlays
    with Chromium(tmp_path / "profile") as b:
        b.open((out / "report.html").resolve().as_uri())
        labels = b.evaluate(
            "[...document.querySelectorAll('#view-buttons button')].map(x => x.textContent)"
        )
        assert labels[-1] == "Grad-CAM (match with the query)"
        b.evaluate("document.querySelector(\"#view-buttons button[data-view='gradcam']\").click()")
        shown = b.evaluate(
            "[...document.querySelectorAll('img.v')].filter(i => getComputedStyle(i).display !== 'none')"
            ".map(i => i.getAttribute('data-view'))"
        )
        assert shown and set(shown) == {"gradcam"}
        assert b.evaluate("document.querySelectorAll('.section img').length") == 2
        assert b.evaluate("document.querySelector('.section img').naturalWidth") > 100
        b.screenshot(tmp_path / "report.png")
