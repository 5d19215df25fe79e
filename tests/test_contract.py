"""The method contract: batches, required keys, method-owned optimisation (two optimisers
stepped alternately, exact resume), freeze hooks, pairwise scoring through the standard
evaluator, per-method options and presets, backbone surgery helpers."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_fakes import FakeMethod, brute_force_metrics, fake_config, write_market_folder
from pydantic import Field
from torch import nn

import reidkit.models as models_pkg
from reidkit.config import ConfigError, load_config
from reidkit.data.loader import CollateError, collate_reid
from reidkit.engine import train
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.evaluator import evaluate_feature_sets, evaluate_model
from reidkit.engine.optim import OptimizerSpec
from reidkit.methods import MethodOptions, MissingBatchKeyError, build_method, register_method
from reidkit.methods.base import _METHODS, method_options
from reidkit.models import build_backbone, split_backbone

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_market_folder(tmp_path_factory.mktemp("market"))


# ------------------------------------------------------------------ test methods
class KeypointMethod(FakeMethod):
    """Needs keypoints in its loss: a head regresses the mean keypoint height."""

    requires = frozenset({"images", "keypoints"})

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.kp_head = nn.Linear(16, 1)
        self.seen_keypoints = 0

    def forward(self, batch):
        out = super().forward(batch)
        out["kp_pred"] = self.kp_head(out["global_feat"]).squeeze(1)
        return out

    def compute_loss(self, outputs, batch):
        losses = super().compute_loss(outputs, batch)
        kp = batch["keypoints"]  # (B, 17, 3), pixels of the transformed image
        assert kp.shape[1:] == (17, 3)
        self.seen_keypoints += kp.shape[0]
        target = kp[..., 1].mean(1) / batch["images"].shape[-2]
        losses["kp"] = F.mse_loss(outputs["kp_pred"], target)
        return losses


class TwoOptimizerMethod(FakeMethod):
    """A GAN-shaped schedule: a "critic" head and the rest, stepped alternately on two
    losses with their own optimisers (as VRSTC's discriminator / generator)."""

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.critic = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))

    def optimizers(self, cfg):
        main = [p for n, p in self.named_parameters() if not n.startswith("critic.")]
        return {
            "critic": OptimizerSpec(
                torch.optim.Adam(self.critic.parameters(), lr=1e-3),
                lambda e: 1e-3 * 0.5 ** int(e >= 2),
                default=False,
            ),
            "main": OptimizerSpec(
                torch.optim.SGD(main, lr=0.01, momentum=0.9), lambda e: 0.01, default=False
            ),
        }

    def train_step(self, batch, ctx):
        # critic step: tell the (detached) features of two identities apart
        outputs = ctx.forward(batch)
        feat = outputs["global_feat"].detach()
        score = self.critic(feat).squeeze(1)
        target = (batch["pids"] % 2).float()
        ctx.step({"critic": F.binary_cross_entropy_with_logits(score, target)}, ["critic"])
        # main step: the usual losses plus a term through the (fixed) critic
        outputs = ctx.forward(batch)
        losses = self.compute_loss(outputs, batch)
        losses["adv"] = 0.1 * self.critic(outputs["global_feat"]).pow(2).mean()
        ctx.step(losses, ["main"])
        return ctx.stats


class PairwiseMethod(FakeMethod):
    """Scores pairs itself from an extra tensor kept with the features: the distance
    between the images' mean rows (a crude pairwise score, unlike the vector metric)."""

    keep_for_eval = ("map_mean",)
    exportable = False

    def encode(self, batch, role="gallery"):
        out = super().encode(batch, role)
        out["map_mean"] = batch["images"].mean(dim=(1, 3))  # (B, H): mean of each row
        return out

    def pairwise_distance(self, query, gallery):
        return torch.cdist(query.extras["map_mean"], gallery.extras["map_mean"])


class ToyOptions(MethodOptions):
    width: int = Field(4, ge=1)
    mode: str = "a"


class ToyOptionMethod(FakeMethod):
    feature_names = ("post_bn", "pre_bn", "mixed")

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.opts = method_options(cfg, ToyOptions, "toy")


for name, cls, kw in (
    ("_kp_fake", KeypointMethod, {}),
    ("_two_opt_fake", TwoOptimizerMethod, {}),
    ("_pairwise_fake", PairwiseMethod, {}),
    ("_toy_options", ToyOptionMethod, {"options": ToyOptions, "section": "toy",
                                       "presets": {"loss": {"metric": "wrt"}}}),
):  # fmt: skip
    if name not in _METHODS:
        register_method(name, **kw)(cls)


# ------------------------------------------------------------------ batch keys
def test_method_needing_keypoints_is_refused_on_a_dataset_without_them(data_root, tmp_path):
    cfg = fake_config(data_root, tmp_path / "kp", **{"model.name": "_kp_fake"})
    with pytest.raises(MissingBatchKeyError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "_kp_fake needs 'keypoints'" in msg
    assert "data.keypoints=FILE" in msg and "reidkit keypoints --onnx" in msg
    assert not (tmp_path / "kp" / "checkpoints" / "last.pt").exists()  # refused before training


def test_method_needing_keypoints_trains_on_the_synthetic_set(tmp_path):
    from reidkit.data.synth import generate

    generate(tmp_path / "synth-tiny", preset="tiny", workers=1, progress=False)
    cfg = fake_config(
        tmp_path,
        tmp_path / "run",
        **{
            "model.name": "_kp_fake",
            "data.dataset": "synth",
            "data.synth_preset": "tiny",
            "solver.max_epochs": 1,
            "solver.iters_per_epoch": 2,
            "test.eval_period": 1,
        },
    )
    run = train(cfg, progress=False)
    log = (run / "log.jsonl").read_text()
    assert '"kp"' in log  # the keypoint term was computed and logged
    assert (run / "metrics.json").is_file()


def test_collate_never_drops_a_key_silently():
    item = {"image": torch.zeros(3, 4, 2), "pid": 0, "camid": 0, "path": "a.jpg", "index": 0}
    with_kp = {**item, "path": "b.jpg", "index": 1, "keypoints": torch.zeros(17, 3)}
    assert "keypoints" in collate_reid([with_kp, with_kp])
    assert "keypoints" not in collate_reid([item, item])
    with pytest.raises(CollateError, match="a.jpg .index 0. does not"):
        collate_reid([with_kp, item])


# ------------------------------------------------------------- optimisation
def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _assert_resume_exact(make_cfg, tmp_path: Path) -> dict:
    full = train(make_cfg(tmp_path / "full"), progress=False)
    part_cfg = make_cfg(tmp_path / "part")
    train(part_cfg, stop_after_epochs=2, progress=False)
    train(part_cfg, resume=True, progress=False)
    a, b = _params(full), _params(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{k} differs after resume")
    ca = load_checkpoint(full / "checkpoints" / "last.pt")
    cb = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert ca["global_step"] == cb["global_step"]
    assert ca["best"] == cb["best"]
    return ca


def test_two_optimizers_alternate_and_resume_exactly(data_root, tmp_path):
    state = _assert_resume_exact(
        lambda out: fake_config(data_root, out, **{"model.name": "_two_opt_fake"}), tmp_path
    )
    assert set(state["optimizers"]) == {"critic", "main"}
    assert state["optimizers"]["critic"]["state"]  # both were stepped
    assert state["optimizers"]["main"]["state"]
    rows = [r for r in _read_log(tmp_path / "full") if r["type"] == "iter"]
    assert {"critic", "adv", "ce", "triplet", "loss"} <= set(rows[0])


def _read_log(run: Path) -> list[dict]:
    from reidkit.engine.log import read_jsonl

    return read_jsonl(run / "log.jsonl")


@pytest.fixture
def tiny_resnet(monkeypatch):
    """Real methods (BoT, CAMA, CGE) on a width-8 ResNet-18, so resume tests stay fast."""

    def tiny(model_cfg):
        return build_backbone(
            "resnet18",
            last_stride=model_cfg.last_stride,
            non_local_layers=model_cfg.non_local_layers if model_cfg.non_local else None,
            width=8,
        )

    monkeypatch.setattr(models_pkg, "backbone_from_config", tiny)
    monkeypatch.setattr("reidkit.methods.baseline.backbone_from_config", tiny)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("bot", {"loss.center_weight": 0.0005}),
        ("cama", {"model.cama.num_branches": 2, "solver.classifier_warm_epochs": 1,
                  "solver.max_epochs": 3, "loss.metric": "none"}),
        ("cge", {"model.cge.num_stripes": 2, "loss.metric": "soft_triplet"}),
        ("scr", {"data.pk_epoch": "identities", "loss.center_weight": 0.0005}),
        ("ianet", {}),
    ],
)  # fmt: skip
def test_real_methods_resume_exactly(data_root, tmp_path, tiny_resnet, name, extra):
    over = {
        "model.name": name,
        "data.height": 32,
        "data.width": 16,
        "solver.iters_per_epoch": 2,
        "test.eval_period": 2,
    }
    state = _assert_resume_exact(
        lambda out: fake_config(data_root, out, **{**over, **extra}), tmp_path
    )
    expected = {
        "bot": {"main", "center"},
        "cama": {"warm", "main"},
        "cge": {"main"},
        "scr": {"main", "center"},
        "ianet": {"main"},
    }[name]
    assert set(state["optimizers"]) == expected


def test_freeze_hook_trains_only_the_classifiers_and_keeps_bn_statistics(
    data_root, tmp_path, tiny_resnet
):
    cfg = fake_config(
        data_root,
        tmp_path / "warm",
        **{
            "model.name": "cama",
            "model.cama.num_branches": 2,
            "loss.metric": "none",
            "data.height": 64,
            "data.width": 32,
            "solver.classifier_warm_epochs": 1,
            "solver.max_epochs": 1,
        },
    )
    torch.manual_seed(cfg.seed)
    init = build_method(cfg, 8).state_dict()
    train(cfg, stop_after_epochs=1, progress=False)
    after = _params(tmp_path / "warm")
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert changed and all(k.startswith("classifiers.") for k in changed), sorted(changed)[:5]


def test_warm_weight_decay_is_an_explicit_option():
    from reidkit.engine.optim import default_optimizers

    cfg = load_config(
        None,
        ["model.name=cama", "model.backbone=resnet18", "solver.classifier_warm_epochs=2",
         "solver.classifier_warm_weight_decay=0"],
    )  # fmt: skip
    model = build_method(cfg, 3)
    specs = default_optimizers(model, cfg)
    assert {g["weight_decay"] for g in specs["warm"].optimizer.param_groups} == {0.0}
    assert {g["weight_decay"] for g in specs["main"].optimizer.param_groups} == {5e-4}
    assert specs["warm"].end_epoch == 2 and specs["main"].start_epoch == 2


# ------------------------------------------------------------------ evaluation
def test_pairwise_scoring_method_through_the_standard_evaluator(tmp_path):
    noisy = write_market_folder(tmp_path / "noisy", num_ids=8, per_cam=3, noise=160.0)
    cfg = fake_config(noisy, tmp_path / "pw", **{"model.name": "_pairwise_fake"})
    from reidkit.data.datasets import dataset_from_config

    torch.manual_seed(0)
    model = build_method(cfg, 8).eval()
    dataset = dataset_from_config(cfg.data)
    result = evaluate_model(cfg, model, dataset, "cpu")
    q, g = result.query, result.gallery
    assert "map_mean" in q.extras and q.extras["map_mean"].shape == (len(q), 32)
    dist = model.pairwise_distance(q, g).numpy()
    ref_map, ref_r1 = brute_force_metrics(
        dist, q.pids.numpy(), g.pids.numpy(), q.camids.numpy(), g.camids.numpy()
    )
    assert result.metrics["mAP"] == pytest.approx(ref_map, abs=1e-6)
    assert result.metrics["rank1"] == pytest.approx(ref_r1, abs=1e-6)
    # chunked scoring gives the same metrics as one block
    one = evaluate_feature_sets(q, g, distance_fn=model.pairwise_distance, chunk_size=1)
    assert one.metrics == pytest.approx(result.metrics)
    # and it is the method's score, not the vector metric
    plain = evaluate_feature_sets(q, g)
    assert plain.raw.all_AP.tolist() != pytest.approx(result.raw.all_AP.tolist())
    assert result.metrics["mAP"] < 1.0


def test_non_vector_methods_refuse_export_and_faiss(data_root, tmp_path):
    from reidkit.export import InferenceModel
    from reidkit.retrieval.index import GalleryIndex

    cfg = fake_config(data_root, tmp_path / "pw", **{"model.name": "_pairwise_fake"})
    model = build_method(cfg, 8)
    with pytest.raises(ValueError, match="scores query-gallery pairs itself"):
        InferenceModel(model)
    with pytest.raises(ValueError, match="scores query-gallery pairs itself"):
        GalleryIndex.build(torch.randn(10, 4), method=model)


def test_query_and_gallery_roles_reach_the_method(data_root, tmp_path):
    roles = []

    class RoleMethod(FakeMethod):
        def encode(self, batch, role="gallery"):
            roles.append(role)
            out = super().encode(batch, role)
            if role == "query":
                out = {k: -v for k, v in out.items()}
            return out

    from reidkit.data.datasets import dataset_from_config

    cfg = fake_config(data_root, tmp_path / "r")
    model = RoleMethod(cfg, 8).eval()
    result = evaluate_model(cfg, model, dataset_from_config(cfg.data), "cpu")
    assert {"query", "gallery"} == set(roles)
    assert result.metrics["mAP"] < 0.5  # query features negated: the ranking is reversed


def test_eval_extras_are_returned_not_printed(data_root, tmp_path, tiny_resnet, capsys):
    from reidkit.data.datasets import dataset_from_config

    cfg = fake_config(
        data_root, tmp_path / "c", **{"model.name": "cama", "model.cama.num_branches": 2,
                                      "data.height": 64, "data.width": 32}
    )  # fmt: skip
    model = build_method(cfg, 8).eval()
    result = evaluate_model(cfg, model, dataset_from_config(cfg.data), "cpu")
    assert capsys.readouterr().out == ""
    assert "branch_overlap" in result.metrics and result.notes


# -------------------------------------------------------------------- options
def test_method_options_and_presets_live_with_the_method(tmp_path):
    cfg = load_config(None, ["model.name=_toy_options", "model.toy.width=7"])
    assert cfg.model.toy.width == 7 and cfg.model.toy.mode == "a"
    assert cfg.loss.metric == "wrt"  # preset filled at load time
    explicit = load_config(None, ["model.name=_toy_options", "loss.metric=triplet"])
    assert explicit.loss.metric == "triplet"  # an explicit value wins
    with pytest.raises(ConfigError, match="did you mean 'model.toy.width'"):
        load_config(None, ["model.name=_toy_options", "model.toy.widht=3"])
    with pytest.raises(ConfigError, match="model.toy.width"):
        load_config(None, ["model.name=_toy_options", "model.toy.width=0"])
    assert load_config(None, ["model.name=_toy_options", "test.feature=mixed"]).test.feature
    with pytest.raises(ConfigError, match=r"offers: post_bn, pre_bn\)"):
        load_config(None, ["model.name=bot", "test.feature=mixed"])
    # the dumped config reloads to the same thing
    from reidkit.config import dump_config

    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    # another method's section is validated, then left out
    bot = load_config(None, ["model.name=bot", "model.toy.width=3"])
    assert not hasattr(bot.model, "toy")
    with pytest.raises(ConfigError, match="did you mean 'model.toy.width'"):
        load_config(None, ["model.name=bot", "model.toy.widht=3"])


def test_unknown_method_name_gets_a_suggestion():
    with pytest.raises(ConfigError, match="unknown method 'camma'; did you mean 'cama'"):
        load_config(None, ["model.name=camma"])


def test_config_command_shows_resolved_cge_and_cama_ide_bn(capsys):
    from reidkit.cli import main

    assert main(["config", "-c", str(REPO / "configs/cge/bot_market1501.yaml")]) == 0
    out = capsys.readouterr().out
    assert "metric: soft_triplet" in out and "feature: pre_bn" in out
    assert "revise_target: probs" in out
    assert main(["config", "-c", str(REPO / "configs/cama/market1501_ide_bn.yaml")]) == 0
    out = capsys.readouterr().out
    assert "name: cama" in out and "num_branches: 1" in out
    assert main(["config", "--methods"]) == 0
    assert "model.cama" in capsys.readouterr().out


# ------------------------------------------------------------------ backbone
def test_insert_blocks_after_given_blocks():
    bb = build_backbone("resnet50", width=8)
    calls = []

    class Probe(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    x = torch.randn(1, 3, 64, 32)
    ref = bb.eval()(x)
    bb.insert_blocks("probe", {"layer2": {1: Probe("l2.1"), 3: Probe("l2.3")}})
    bb.insert_blocks("other", {"layer3": [5]}, make_block=lambda c: Probe(f"l3.5:{c}"))
    torch.testing.assert_close(bb(x), ref)  # identity probes change nothing
    assert calls == ["l2.1", "l2.3", "l3.5:128"]  # in block order, with the stage width
    assert bb.inserted_groups == {"probe": {"layer2": [1, 3]}, "other": {"layer3": [5]}}
    with pytest.raises(ValueError, match="out of range"):
        bb.insert_blocks("bad", {"layer4": [3]}, make_block=lambda c: nn.Identity())
    with pytest.raises(ValueError, match="already inserted"):
        bb.insert_blocks("probe", {"layer2": [0]}, make_block=lambda c: nn.Identity())


@pytest.mark.parametrize("at", ["layer4", "layer3.1"])
def test_split_backbone_trunk_and_branches(at):
    torch.manual_seed(0)
    bb = build_backbone("resnet50", width=8).eval()
    x = torch.randn(2, 3, 64, 32)
    ref = bb(x)
    stages = [m.detach().clone() for m in bb.forward_stages(x)]
    trunk, branches = split_backbone(bb, at, 3)
    with torch.no_grad():
        mid = trunk(x)
        for branch in branches:
            torch.testing.assert_close(branch(mid), ref)
    if at == "layer4":
        torch.testing.assert_close(mid, stages[2])
    # the copies are independent
    with torch.no_grad():
        next(branches[0].parameters()).add_(1.0)
    assert not torch.equal(next(branches[0].parameters()), next(branches[1].parameters()))
    keys = list(itertools.islice(branches.state_dict(), 1))
    assert keys[0].startswith("0.")


def test_architecture_doc_example_method_trains_and_evaluates(data_root, tmp_path):
    """The 40-line example of docs/architecture.md, run as written: it registers, trains
    with its own loss terms and is evaluated through the standard evaluator."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'register_method("two_scale"' in code and len(code.splitlines()) <= 60
    _METHODS.pop("two_scale", None)
    try:
        exec(compile(code, "docs/architecture.md", "exec"), {"__name__": "two_scale_doc"})
        cfg = fake_config(
            data_root,
            tmp_path / "run",
            **{
                "model.name": "two_scale",
                "model.backbone": "resnet18",
                "model.backbone_options": "{width: 8}",
                "solver.max_epochs": 1,
                "solver.iters_per_epoch": 2,
                "test.eval_period": 1,
            },
        )
        assert cfg.loss.metric == "triplet"  # the method's preset applied at load
        run = train(cfg, progress=False)
        log = (run / "log.jsonl").read_text()
        assert all(f'"{t}"' in log for t in ("ce_0", "ce_1", "triplet_0", "triplet_1"))
        assert (run / "metrics.json").is_file()
    finally:
        _METHODS.pop("two_scale", None)
