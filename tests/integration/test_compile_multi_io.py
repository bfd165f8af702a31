"""A Keras model with two named inputs and two named outputs, through every variant, the agent's bench and back."""

from __future__ import annotations

import numpy as np
import pytest

from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.errors import InputError
from edge_kit.profiles import load_profile


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """A small two-input (image, meta), two-output (cls, box) model trained briefly, with its data files."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    meta = keras.Input((3,), name="meta")
    h = keras.layers.Conv2D(8, 3, activation="relu")(image)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Concatenate()([h, keras.layers.Dense(8, activation="relu")(meta)])
    model = keras.Model([image, meta], {"cls": keras.layers.Dense(4, activation="softmax", name="cls")(h),
                                        "box": keras.layers.Dense(4, name="box")(h)})
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 4, n)
    img = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) * 0.3
    img[np.arange(n), y * 2, y * 2, 0] += 3.0  # the class is where the bright pixel is
    mt = rng.normal(size=(n, 3)).astype(np.float32)
    box = np.stack([mt[:, 0], mt[:, 1], mt[:, 0] + 1, mt[:, 1] + 1], axis=1).astype(np.float32)
    model.compile(optimizer="adam", loss={"cls": "sparse_categorical_crossentropy", "box": "mse"})
    model.fit({"image": img, "meta": mt}, {"cls": y, "box": box}, epochs=15, verbose=0)
    folder = tmp_path_factory.mktemp("multi")
    model.save(folder / "two.keras")
    np.savez(folder / "calib.npz", **{"x.image": img[:120], "x.meta": mt[:120]})
    np.savez(folder / "eval.npz", **{"x.image": img[120:], "x.meta": mt[120:], "y": y[120:]})
    return folder


def test_every_variant_keeps_the_names_and_is_measured_per_output(two_by_two, tmp_path):
    m = compile_model(CompileRequest(two_by_two / "two.keras", [load_profile("rpi5")], tmp_path,
                                     calib=two_by_two / "calib.npz", eval=two_by_two / "eval.npz",
                                     task_options={"output": "cls"}))
    assert m.model["inputs"] == {"image": [8, 8, 1], "meta": [3]} and sorted(m.model["outputs"]) == ["box", "cls"]
    for vid in ("fp32", "fp16", "dynamic-int8", "int8"):
        a = m.artifact(vid)
        assert a.status == "built", (vid, a.reason)
        assert sorted(p["name"] for p in a.inputs) == ["image", "meta"] and sorted(p["name"] for p in a.outputs) == ["box", "cls"]
        assert set(a.fidelity.outputs) == {"box", "cls"} and "top1_agreement" not in a.fidelity.outputs["box"]
        assert a.accuracy.metric == "top1" and a.accuracy.value > 0.8
    assert m.artifact("fp32").fidelity.snr_db == 200.0  # itself
    assert m.artifact("int8").fidelity.snr_db < m.artifact("fp16").fidelity.snr_db
    with np.load(tmp_path / "two" / "eval.npz") as shipped:
        assert {"x.image", "x.meta", "y", "reference.cls", "reference.box", "metric"} <= set(shipped.files)

    from device_agents.bench import run_bench
    from edgekit_protocol.config import BenchSettings

    r = run_bench(tmp_path / "two" / "int8.tflite", BenchSettings(warmup=1, min_runs=5, min_seconds=0),
                  eval_file=tmp_path / "two" / "eval.npz")
    host = m.artifact("int8")
    assert r["accuracy"]["metric"] == "top1" and r["accuracy"]["value"] == pytest.approx(host.accuracy.value)
    assert r["fidelity"]["outputs"]["box"]["snr_db"] == pytest.approx(host.fidelity.outputs["box"]["snr_db"], abs=0.01)


def test_a_missing_input_key_is_named_before_anything_is_converted(two_by_two, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 8, 8, 1), np.float32))
    with pytest.raises(InputError, match=r"no array 'x.image' for input 'image' \(expected: x.image, x.meta; found: x\)"):
        compile_model(CompileRequest(two_by_two / "two.keras", [load_profile("rpi5")], tmp_path / "out",
                                     calib=tmp_path / "bad.npz"))
    assert not (tmp_path / "out" / "two").exists()
