"""Writes that are atomic, ONNX files of any size, and files written by a newer ftdeploy."""

import json
import logging

import numpy as np
import onnx
import pytest

from ftdeploy import onnx_model


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    from ftdeploy.files import atomic_path, write_json

    target = tmp_path / "report.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "trunc')  # a crash in the middle of the write
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_large_models_keep_their_weights_outside_the_protobuf(tiny_export, tmp_path, monkeypatch):
    """Over the 2 GB limit (lowered here) a file is saved with external data, which copies, moves and
    metadata updates carry along; saved small again, the stale weights file goes."""
    from ftdeploy.onnx_model import copy_onnx, external_data, move_onnx, save_onnx, update_metadata

    model = onnx.load(str(tiny_export / "model.onnx"))
    size = model.ByteSize()
    monkeypatch.setattr(onnx_model, "TWO_GB", 10_000)
    big = tmp_path / "big.onnx"
    save_onnx(model, big)
    assert external_data(big).is_file() and big.stat().st_size < size / 4
    (tmp_path / "copied").mkdir()
    copy_onnx(big, tmp_path / "copied" / "big.onnx")
    assert external_data(tmp_path / "copied" / "big.onnx").is_file()
    move_onnx(tmp_path / "copied" / "big.onnx", tmp_path / "moved.onnx")
    update_metadata(tmp_path / "moved.onnx", {"temperature": 2.0})
    assert not (tmp_path / "copied" / "big.onnx.data").exists() and external_data(tmp_path / "moved.onnx").is_file()
    session = onnx_model.open_session(tmp_path / "moved.onnx", 1)
    x = np.zeros((1, 3, 16, 16), np.float32)
    expected = onnx_model.open_session(tiny_export / "model.onnx", 1).run(None, {"input": x})[0]
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected)
    assert onnx_model.read_metadata(session)["temperature"] == 2.0
    monkeypatch.setattr(onnx_model, "TWO_GB", 2**31)
    save_onnx(onnx.load(str(big)), big)
    assert not external_data(big).exists() and big.stat().st_size >= size


def test_a_file_from_a_newer_version_loads_and_keeps_what_it_does_not_know(tiny_export, tmp_path, caplog):
    from ftdeploy.onnx_model import OnnxModel, model_metadata, write_metadata

    newer = tmp_path / "model.onnx"
    model = onnx.load(str(tiny_export / "model.onnx"))
    meta = model_metadata(model)
    write_metadata(model, {**meta, "preprocessing": {**meta["preprocessing"], "antialias": True}, "tokenizer_v9": "x"})
    onnx.save(model, str(newer))
    with caplog.at_level(logging.WARNING):
        clf = OnnxModel(newer, threads=1)
    assert "antialias" in caplog.text and clf.preprocessing.input_size == 16
    from ftdeploy.onnx_model import update_metadata

    update_metadata(newer, {"temperature": 1.5})  # rewriting the metadata keeps the unknown keys
    kept = model_metadata(onnx.load(str(newer)))
    assert kept["tokenizer_v9"] == "x" and kept["preprocessing"]["antialias"] is True and kept["temperature"] == 1.5
