"""Latency: the model timed is the shipped export op for op, both formats are measured and cached
together, and a format that fails to convert is that format's error only."""

import json
import logging

import numpy as np
import pytest

from mobiletune.config import load_config
from mobiletune.errors import ExportError
from mobiletune.model import network as model_lib
from mobiletune.model.network import create_model
from mobiletune.ship import latency
from mobiletune.ship.export import export_formats, serving_function, tflite_for_timing
from mobiletune.ship.tflite_metadata import ModelInfo

SIZE = 32  # the smallest input Keras' MobileNetV2 takes: ops and shapes are what is compared


def _ops(blob_or_path) -> list[tuple]:
    from ai_edge_litert.interpreter import Interpreter

    source = blob_or_path
    interpreter = Interpreter(model_content=source) if isinstance(source, bytes) else Interpreter(str(source))
    tensors = {t["index"]: (tuple(t["shape"]), np.dtype(t["dtype"]).name) for t in interpreter.get_tensor_details()}
    return [(op["op_name"], [tensors[i] for i in op["inputs"] if i >= 0]) for op in interpreter._get_ops_details()]


@pytest.mark.parametrize("fmt", latency.FORMATS)  # fp16 differs: one constant folded to a scalar
def test_the_timed_model_has_the_shipped_exports_ops(fmt, tmp_path):
    config = load_config(overrides=[f"data.image_size={SIZE}", "model.weights=none"])
    model = create_model(config, 3)
    calibration = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    info = ModelInfo("m", "a test model", "1", "", "", ["a", "b", "c"])
    shipped = export_formats(model, [fmt], tmp_path, info, calibration)[fmt]
    timed = tflite_for_timing(serving_function(model), fmt, calibration)
    assert _ops(timed) == _ops(shipped)
    assert len(_ops(timed)) > 60  # the whole network, not an empty or partial graph


def test_both_formats_are_measured_once_and_cached(tmp_path, monkeypatch, capfd, caplog, recwarn):
    config = load_config(overrides=[f"data.image_size={SIZE}"])
    calls = []
    real = latency.measure

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, repeats=2, blocks=1)

    monkeypatch.setattr(latency, "measure", counted)
    float_ms = latency.latency_ms(config, 2, "tflite", tmp_path)
    int8_ms = latency.latency_ms(config, 2, "tflite-int8", tmp_path)
    assert calls == [list(latency.FORMATS)] and float_ms > 0 and int8_ms > 0
    assert latency.latency_ms(config, 2, "tflite", tmp_path) == float_ms and len(calls) == 1  # from the file
    assert len(json.loads((tmp_path / latency.FILE_NAME).read_text())) == 2
    out, err = capfd.readouterr()
    assert out + err == ""  # the converters' warnings and log lines stay off the console
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in recwarn] == []


def test_only_the_formats_not_yet_known_are_measured(tmp_path, monkeypatch):
    config = load_config(overrides=[f"data.image_size={SIZE}"])
    (tmp_path / latency.FILE_NAME).write_text(json.dumps({latency._key(config, 2, "tflite"): 1.25}))
    calls = []
    monkeypatch.setattr(latency, "measure",
                        lambda c, n, formats, **_: (calls.append(formats) or ({"tflite-int8": 0.5}, {})))
    assert latency.latency_ms(config, 2, "tflite-int8", tmp_path) == 0.5 and calls == [["tflite-int8"]]
    assert latency.latency_ms(config, 2, "tflite", tmp_path) == 1.25 and len(calls) == 1
    monkeypatch.setattr(latency, "measure", lambda c, n, formats, **_: (calls.append(formats) or ({"tflite": 2.0}, {})))
    assert latency.latency_ms(config, 2, "tflite", None) == 2.0 and calls[-1] == ["tflite"]  # only what is asked


def test_a_worker_waits_for_another_ones_timing_and_uses_its_figures(tmp_path, monkeypatch):
    """Two timings at once slow each other down, so a second worker sharing the cache waits for the first
    (here: the lock held by the test, as another process would) and then takes its figures."""
    import socket
    import threading

    from mobiletune import runfolder

    config = load_config(overrides=[f"data.image_size={SIZE}"])
    calls = []
    monkeypatch.setattr(latency, "measure", lambda c, n, formats, **_: (calls.append(formats) or ({"tflite": 9.0}, {})))
    got = []
    with runfolder.exclusive(tmp_path / f".latency-{socket.gethostname()}.lock"):
        worker = threading.Thread(target=lambda: got.append(latency.latency_ms(config, 2, "tflite", tmp_path)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not calls  # waiting, not timing alongside
        figures = {latency._key(config, 2, f): 1.5 for f in latency.FORMATS}
        (tmp_path / latency.FILE_NAME).write_text(json.dumps(figures))
    worker.join(timeout=10)
    assert got == [1.5] and not calls  # the other worker's figure, not a second measurement


def test_a_format_that_fails_is_its_own_error(tmp_path, monkeypatch):
    import mobiletune.ship.export as export

    real = export.tflite_for_timing

    def int8_breaks(function, variant, representative):
        if variant == "tflite-int8":
            raise RuntimeError("quantizer fell over\nsecond line")
        return real(function, variant, representative)

    monkeypatch.setattr(export, "tflite_for_timing", int8_breaks)
    monkeypatch.setattr(latency, "_FAILED", {})
    config = load_config(overrides=[f"data.image_size={SIZE}"])
    with pytest.raises(ExportError, match=r"^export tflite-int8: conversion failed \(quantizer fell over\)$"):
        latency.latency_ms(config, 2, "tflite-int8", tmp_path)
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert latency.latency_ms(config, 2, "tflite", tmp_path) > 0  # cached with the failure
    with pytest.raises(ExportError, match="quantizer fell over"):  # the failure is remembered, not retried
        latency.latency_ms(config, 2, "tflite-int8", tmp_path)


def test_a_given_model_is_timed_without_building_another(tmp_path, monkeypatch):
    """A sweep passes the classifier it builds for each size's features anyway (0.45 s a size)."""
    config = load_config(overrides=[f"data.image_size={SIZE}", "model.weights=none"])
    model = create_model(config, 2)

    def no_building(*args, **kwargs):
        raise AssertionError("built a model")

    monkeypatch.setattr(model_lib, "create_model", no_building)
    assert latency.latency_ms(config, 2, "tflite", tmp_path, model) > 0
