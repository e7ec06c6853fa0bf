"""Token classification: a tiny BERT with a tag per token, fine-tuned on tagged sentences made in the
test; its words, windows, entities, metric, file, server and report."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import FAST_EXPORT, cli

from ftdeploy.errors import DataError


@pytest.fixture(scope="session")
def ner_bert(tmp_path_factory):
    from nerdata import WORDS
    from textdata import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("ner-bert") / "tiny-bert", WORDS)


@pytest.fixture(scope="session")
def ner_conll(tmp_path_factory):
    from nerdata import write_conll

    return write_conll(tmp_path_factory.mktemp("ner-data") / "tagged.conll")


def ner_config(out, bert, data, *overrides):
    from ftdeploy.config import load_config

    return load_config(None, ["task=token_classification", f"model.name=hf:{bert}", "model.weights=DEFAULT",
                              "model.options={head: tokens}", "data.name=conll", f"data.root={data}",
                              "data.test_fraction=0.5", "data.batch_size=16", "preprocessing.max_length=24",
                              "train.epochs=6", "train.lr=0.003", "train.warmup_epochs=0", "train.label_smoothing=0",
                              "train.progress=false", "train.checkpoint=false", f"output_dir={out}", *overrides])


@pytest.fixture(scope="session")
def ner_run(ner_bert, ner_conll, tmp_path_factory):
    from ftdeploy.train import train

    return train(ner_config(tmp_path_factory.mktemp("ner") / "run", ner_bert, ner_conll))


@pytest.fixture(scope="session")
def ner_export(ner_run, tmp_path_factory):
    from ftdeploy.config import ExportConfig
    from ftdeploy.export import export

    return export(ner_run, tmp_path_factory.mktemp("ner-export") / "export", ExportConfig(**FAST_EXPORT))


def spec_of(bert, max_length=24, stride=None):
    from ftdeploy.tasks.tokens.spans import TokenPreprocessing

    return TokenPreprocessing((bert / "tokenizer.json").read_text(), max_length, stride=stride)


def test_a_long_text_is_read_in_windows_where_every_word_is_read_once(ner_bert):
    spec = spec_of(ner_bert, max_length=12, stride=3)
    rng = random.Random(0)
    from nerdata import WORDS

    for n in (1, 5, 9, 10, 11, 30, 77):
        text = " ".join(rng.choice([w for w in WORDS if w.isalpha()]) + rng.choice(["", "xq"]) for _ in range(n))
        windows = spec.encode([text]).windows
        assert all(len(w.ids) <= 12 for w in windows)
        read = [w.first + k for w in windows for k in range(len(w.heads))]
        assert read == list(range(len(windows[0].text))) == list(range(n))
        full = spec.compiled.encode(text)
        for w in windows:  # each head is the first subword of its word, and the window holds it
            for k, position in enumerate(w.heads):
                token = full.word_to_tokens(w.first + k)[0]
                assert w.ids[position] == full.ids[token]
        if len(windows) > 1:  # neighbours share `stride` tokens
            assert (windows[0].ids[-4:-1] == windows[1].ids[1:4]).all()


def test_a_stride_of_more_than_half_a_window_is_refused_with_the_most_it_may_be(ner_bert):
    from ftdeploy.config import PreprocessingConfig
    from ftdeploy.errors import ConfigError
    from ftdeploy.tasks import get_task

    task, tokenizer = get_task("token_classification"), {"tokenizer": (ner_bert / "tokenizer.json").read_text()}
    with pytest.raises(ConfigError, match="at most 12"):
        task.resolve_preprocessor(PreprocessingConfig(max_length=24, stride=20), tokenizer)
    assert task.resolve_preprocessor(PreprocessingConfig(max_length=24), tokenizer).to_dict()["stride"] == 6


def test_the_decoding_rule_is_what_seqeval_counts_once_stray_tags_are_repaired():
    from seqeval.scheme import IOB2, Entities

    from ftdeploy.tasks.tokens.spans import entities, repaired

    rng = np.random.default_rng(0)
    tags = ["O", "B-a", "I-a", "B-b", "I-b"]
    for _ in range(300):
        seq = [tags[k] for k in rng.integers(0, 5, rng.integers(1, 12))]
        ours = {(k, a, b) for k, a, b, _ in entities(seq, np.ones(len(seq)))}
        theirs = {(e.tag, e.start, e.end) for e in Entities([repaired(seq)], IOB2).entities[0]}
        assert ours == theirs, seq
    # seqeval's strict mode alone drops a stray I- (the reason for the repair)
    assert Entities([["O", "I-a"]], IOB2).entities[0] == []
    assert entities(["O", "I-a"], np.array([1.0, 0.7])) == [("a", 1, 2, 0.7)]


def test_the_metric_is_seqeval_with_an_interval_per_type_and_untyped():
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    from ftdeploy.tasks.tokens.metric import entity_scores

    gold = [["B-per", "I-per", "O", "B-loc"], ["B-loc", "O"], ["O", "B-org"]] * 20
    pred = [["B-per", "I-per", "O", "B-per"], ["B-loc", "O"], ["O", "O"]] * 20
    s = entity_scores(gold, pred)
    assert s["f1"] == pytest.approx(f1_score(gold, pred, mode="strict", scheme=IOB2))
    assert s["f1_low"] < s["f1"] < s["f1_high"]
    assert s["untyped_f1"] > s["f1"]  # the loc read as per is right as a span
    assert s["per_type"]["loc"]["support"] == 40 and s["per_type"]["org"]["recall"] == 0


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, body, problem, kept", [
    ("conll", "New\tB-loc\nYork\tI-loc\n\nbad-line-without-tag\n", ":4: expected a token and a tag", 11),
    ("conll", "New\tB-loc\nYork\tI-per\n", ":2: I-per continues an entity of type 'loc'", 10),
    ("conll", "New\tX-loc\n", ":1: tag 'X-loc' is not IOB2", 10),
    ("tagged_jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', ":1: 2 tokens and 1 tags", 10),
    ("tagged_jsonl", "{oops\n", ":1: not JSON", 10),
])
def test_bad_annotations_are_named_by_line_or_skipped_and_counted(ner_bert, tmp_path, name, body, problem, kept):
    from ftdeploy.config import DataConfig
    from ftdeploy.data import build_datasets

    good = "".join(f"w{i}\tO\nparis\tB-loc\n\n" for i in range(10)) if name == "conll" else "".join(
        json.dumps({"tokens": [f"w{i}", "paris"], "tags": ["O", "B-loc"]}) + "\n" for i in range(10))
    path = write(tmp_path / "data.txt", body + ("\n" if name == "conll" else "") + good)
    with pytest.raises(DataError, match=problem.replace("(", r"\(").replace(")", r"\)")) as e:
        build_datasets(DataConfig(name=name, root=path), spec_of(ner_bert))
    assert "on_corrupt=skip" in e.value.hint
    splits = build_datasets(DataConfig(name=name, root=path, on_corrupt="skip"), spec_of(ner_bert))
    assert len(splits.skipped) == 1 and problem in splits.skipped[0]
    assert len(splits.train) + len(splits.val) == kept
    assert splits.classes == ["O", "B-loc", "I-loc"]


def test_words_keep_every_entity_of_tokens_the_pre_tokenizer_splits(ner_bert, tmp_path):
    from ftdeploy.config import DataConfig
    from ftdeploy.data import build_datasets

    path = write(tmp_path / "t.conll", "rt\tO\n@anna_khan\tB-per\nlove\tO\nnew-york\tB-loc\n\n" * 4)
    splits = build_datasets(DataConfig(name="conll", root=path, val_fraction=0.5), spec_of(ner_bert))
    window, gold = splits.val[0]
    words = [window.text.text[a:b] for a, b in window.text.spans]
    assert words == ["rt", "@", "anna", "_", "khan", "love", "new", "-", "york"]
    assert [splits.classes[k] for k in gold] == ["O", "B-per", "I-per", "I-per", "I-per", "O", "B-loc", "I-loc", "I-loc"]


def test_the_wnut16_tweets_are_split_by_tweet_with_every_entity(tmp_path):
    from ftdeploy.config import DataConfig
    from ftdeploy.data import build_datasets
    from ftdeploy.models import hf_directory
    from ftdeploy.tasks.tokens.spans import TokenPreprocessing, entities

    spec = TokenPreprocessing((hf_directory("all-MiniLM-L6-v2") / "tokenizer.json").read_text(), 128)
    splits = build_datasets(DataConfig(name="wnut16", val_fraction=0.3, test_fraction=0.5), spec)
    counts = {}
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        counts[name] = (len(part), sum(len(entities([splits.classes[k] for k in g], np.ones(len(g)))) for _, g in part.items))
    assert counts == {"train": (1676, 1053), "val": (359, 220), "test": (359, 223)}  # 2,394 tweets, 1,496 entities
    assert len(splits.classes) == 21
    seen = {id(part[i][0].text) for part in (splits.train, splits.val) for i in range(len(part))}
    assert not seen & {id(splits.test[i][0].text) for i in range(len(splits.test))}


def test_the_ner_run_learns_the_entities_and_its_file_keeps_both_axes_dynamic(ner_run, ner_export):
    import onnx

    metrics = json.loads((ner_run / "metrics.json").read_text())
    assert metrics["metric"] == "f1" and metrics["val_metric"] >= 0.8, metrics
    graph = onnx.load(str(ner_export / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["logits"][:2] == ["batch", "sequence"]
    report = json.loads((ner_export / "report.json").read_text())
    parity = report["variants"]["fp32"]["parity"]
    assert parity["passed"] and parity["decision"] == "tags" and set(parity["input_sets"]) == {"validation", "length 8", "length 16"}


def test_a_tweet_longer_than_max_length_gets_its_entity_past_the_cut_back(ner_export):
    from ftdeploy.onnx_model import OnnxModel

    model = OnnxModel(ner_export / "model.onnx", threads=1)
    codec = model.task.codec
    short = codec.answer(model, ["lunch with Anna Smith in paris"])["entities"]
    assert [e["label"] for e in short] == ["per", "loc"]
    filler = "so good lol " * 12  # 36 words: past max_length (24)
    long = codec.answer(model, [filler + "lunch with Anna Smith in paris"])["entities"]
    assert [(e["label"], e["text"]) for e in long] == [(e["label"], e["text"]) for e in short]
    assert all((filler + "lunch with Anna Smith in paris")[e["start"]:e["end"]] == e["text"] for e in long)
    assert len(model.preprocess([filler])) > 1


ODD = ["  Lunch   with\tAnna Smith 😀 in  paris!! https://t.co/x1 ", "café at acme\u00a0in tokyo", "Ánna Khan ✨ boston"]


def test_offsets_return_each_entitys_exact_characters_through_odd_text(ner_export):
    from ftdeploy.onnx_model import OnnxModel

    model = OnnxModel(ner_export / "model.onnx", threads=1)
    answers = model.task.codec.answer(model, ODD)["predictions"]
    found = [e for text, a in zip(ODD, answers) for e in a["entities"] if text[e["start"]:e["end"]] == e["text"]]
    assert len(found) == sum(len(a["entities"]) for a in answers) >= 5
    assert {"Anna Smith", "paris", "tokyo", "Ánna Khan", "boston"} <= {e["text"] for e in found}


@pytest.fixture(scope="module")
def ner_server(ner_export):
    from test_serve import InProcess

    from ftdeploy.serve import Limits, create_app

    server = InProcess(create_app(ner_export / "model.onnx", threads=1, limits=Limits(max_images=4, max_request_bytes=4096)))
    yield server
    server.close()


def test_the_server_answers_texts_and_pre_split_tokens_as_the_file_does_offline(ner_server, ner_export):
    from ftdeploy.onnx_model import OnnxModel

    model = OnnxModel(ner_export / "model.onnx", threads=1)
    codec = model.task.codec
    many = ner_server.post("/v1/predict", json={"texts": ODD})
    assert many.status_code == 200 and many.json() == codec.answer(model, ODD), many.text
    one = ner_server.post("/v1/predict", json={"text": ODD[0]})
    assert codec.compare(one.json(), codec.answer(model, [ODD[0]])) == (True, 0)
    tokens = ["rt", "@Anna_Khan", "loves", "new", "paris", "!"]
    split = ner_server.post("/v1/predict", json={"tokens": tokens}).json()["entities"]
    joined, starts = " ".join(tokens), np.cumsum([0] + [len(t) + 1 for t in tokens])
    assert ("loc", "paris", [4]) in [(e["label"], e["text"], e["tokens"]) for e in split]
    for e in split:  # offsets into the tokens joined by single spaces; the tokens each entity touches
        assert joined[e["start"]:e["end"]] == e["text"]
        assert e["tokens"] == [i for i, t in enumerate(tokens) if starts[i] < e["end"] and starts[i] + len(t) > e["start"]]
    # concurrent requests share micro-batches: the same answers
    answers = ner_server.gather([{"json": {"text": t}} for t in ODD * 3])
    assert [a.json() for a in answers] == [codec.answer(model, [t]) for t in ODD] * 3


@pytest.mark.parametrize("request_kwargs, status, code", [
    ({"json": {"text": ""}}, 400, "empty_text"),
    ({"json": {"texts": []}}, 400, "no_texts"),
    ({"json": {"texts": ["a"] * 5}}, 413, "too_many_texts"),
    ({"json": {"tokens": []}}, 400, "invalid_json"),
    ({"json": {"tokens": ["new york"]}}, 400, "invalid_tokens"),
    ({"json": {"tokens": ["a", 3]}}, 400, "invalid_tokens"),
    ({"json": {"tokens": ["a"], "text": "b"}}, 400, "invalid_json"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_body"),
    ({"content": b"\xff bad", "headers": {"content-type": "text/plain"}}, 400, "invalid_encoding"),
    ({"content": b"x" * 5000, "headers": {"content-type": "text/plain"}}, 413, "request_too_large"),
    ({"files": {"f": ("a.png", b"\x89PNG", "image/png")}}, 415, "unsupported_media_type"),
])
def test_bad_ner_requests_get_a_4xx_and_the_server_keeps_serving(ner_server, request_kwargs, status, code):
    r = ner_server.post("/v1/predict", **request_kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert ner_server.post("/v1/predict", json={"text": "paris"}).status_code == 200


def test_tritonclient_gets_the_same_spans_through_v2(ner_export):
    import tritonclient.http as triton

    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.serve import create_app
    from oip import ThreadedServer, drive

    model = OnnxModel(ner_export / "model.onnx", threads=1)
    expected = model.task.codec.answer(model, ODD)["predictions"]

    def inputs(binary):
        x = triton.InferInput("text", [len(ODD)], "BYTES")
        x.set_data_from_numpy(np.array([t.encode() for t in ODD], dtype=object), binary_data=binary)
        return [x]

    server = ThreadedServer(create_app(ner_export / "model.onnx", threads=1))
    try:
        got = drive(server, "model", inputs, ["entities"])["entities"]
        assert [json.loads(g) for g in got] == [p["entities"] for p in expected]
    finally:
        server.close()


def test_ner_report_scores_types_corrupts_words_with_their_tags_and_shows_spans(ner_export, tmp_path):
    from ftdeploy.config import ReportConfig
    from ftdeploy.usability import report

    # peak memory is the generic report's (a process per variant): tested with the other tasks
    html = report(ner_export, ReportConfig(output=tmp_path / "report.html", val_limit=30, samples=1, severities=[3],
                                           batch_sizes=[1], lengths=[8], latency_seconds=0.05, peak_memory=False))
    record = json.loads(html.with_name("usability.json").read_text())
    fp32 = record["variants"]["fp32"]
    assert set(fp32["robustness"]["by_corruption"]) == {"typo_swap", "typo_delete", "typo_insert", "word_dropout",
                                                        "punctuation"}
    perf = fp32["performance"]
    assert perf["types"] == ["loc", "org", "per", "(none)"] and perf["f1_low"] <= perf["f1"] <= perf["f1_high"]
    assert 0 <= fp32["calibration"]["ece"] <= 1
    page = html.read_text()
    assert "Entities in context" in page and 'class="gold"' in page and "Casing is no corruption" in page
    assert fp32["saliency"]["maps"]


def test_cli_runs_the_token_task_end_to_end_from_a_config(ner_bert, ner_conll, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "ner.yaml"
    config.write_text(f"""task: token_classification
output_dir: {out}
data: {{name: conll, root: {ner_conll}, batch_size: 16}}
model: {{name: "hf:{ner_bert}", weights: DEFAULT, options: {{head: tokens}}}}
preprocessing: {{max_length: 24}}
train: {{epochs: 1, lr: 0.003, warmup_epochs: 0, progress: false, checkpoint: false}}
""")
    result = cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "model.json").read_text())["hf_head"] == "tokens"


def test_pruning_a_token_classifier_distils_its_token_logits_and_the_pruned_file_passes_parity(ner_run, tmp_path):
    from ftdeploy.config import ExportConfig, PruneConfig
    from ftdeploy.export import export
    from ftdeploy.prune import prune
    from ftdeploy.rundir import load_run

    out = prune(ner_run, tmp_path / "pruned", PruneConfig(target_macs=0.5, finetune_epochs=2, distill_alpha=0.5,
                                                          latency_seconds=0.05, round_to=None))
    record = json.loads((out / "prune_report.json").read_text())
    assert record["ratios"]["macs"] <= 0.5 and record["metric"] == "f1"
    model = load_run(out).load_model()
    assert [m.num_attention_heads for m in model.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "query")
            ] == [1, 1] and model.classifier.out_features == 7  # O and B-/I- of loc, org, per
    report = json.loads((export(out, tmp_path / "export", ExportConfig(**FAST_EXPORT)) / "report.json").read_text())
    assert report["gates"]["passed"] and report["variants"]["fp32"]["scores"]["f1"] >= 0.6, report["variants"]["fp32"]["scores"]


def test_a_dynamic_int8_token_classifier_answers_each_text_alone_at_its_own_length(ner_export, tmp_path):
    """A batch-dependent file runs each text alone; their logits, of different lengths, are padded with zeros."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ftdeploy.onnx_model import OnnxModel, update_metadata

    int8 = tmp_path / "model.int8.onnx"
    quantize_dynamic(str(ner_export / "model.unoptimized.onnx"), str(int8), weight_type=QuantType.QInt8)
    update_metadata(int8, {**OnnxModel(ner_export / "model.onnx").metadata, "batch_dependent": True})
    model = OnnxModel(int8, threads=1)
    texts = ["anna smith in paris", "lunch at acme with omar khan in tokyo today so good lol"]
    together = model.outputs(model.preprocess(texts))[0]
    for i, text in enumerate(texts):  # its own answer over its tokens, zeros past them
        alone = model.outputs(model.preprocess([text]))[0][0]
        np.testing.assert_array_equal(together[i, :len(alone)], alone)
        assert not together[i, len(alone):].any()
    assert model.task.codec.answer(model, texts)["predictions"][0] == model.task.codec.answer(model, texts[:1])


def test_ner_serving_needs_neither_torch_nor_transformers_nor_seqeval(ner_export, tmp_path):
    import os
    import subprocess
    import sys

    blocked = tmp_path / "blocked"
    for name in ("torch", "transformers", "seqeval"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    code = ("import sys; from ftdeploy.serve import create_app; from ftdeploy.onnx_model import OnnxModel; "
            f"m = OnnxModel({str(ner_export / 'model.onnx')!r}, threads=1); create_app(m.path, threads=1); "
            "print([e['text'] for e in m.task.codec.answer(m, ['lunch with Anna Smith in paris'])['entities']], "
            "*[name in sys.modules for name in ('torch', 'transformers', 'seqeval')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(blocked)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["False", "False", "False"] and "'paris']" in done.stdout
