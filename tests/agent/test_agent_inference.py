import numpy as np
import pytest

from device_agents.inference import SNR_CAP_DB, fidelity, output_fidelity


def test_fidelity_per_output_with_the_worst_on_top():
    ref = {"probs": np.array([[1.0, 0.0], [0.0, 1.0]]), "box": np.array([[1.0, 2.0], [3.0, 4.0]])}
    out = {"probs": np.array([[0.9, 0.2], [0.6, 0.5]]), "box": np.array([[1.0, 2.0], [3.0, 4.0]])}
    f = fidelity(out, ref)
    probs = f["outputs"]["probs"]
    assert probs["top1_agreement"] == 0.5  # a probability vector: argmax agreement applies
    assert probs["max_abs_error"] == pytest.approx(0.6)
    assert probs["mean_abs_error"] == pytest.approx((0.1 + 0.2 + 0.6 + 0.5) / 4)
    assert probs["snr_db"] == pytest.approx(10 * np.log10(2.0 / (0.01 + 0.04 + 0.36 + 0.25)), abs=1e-3)
    assert f["outputs"]["box"]["snr_db"] == SNR_CAP_DB and "top1_agreement" not in f["outputs"]["box"]
    assert f["snr_db"] == probs["snr_db"] and f["max_abs_error"] == pytest.approx(0.6)


def test_an_output_that_computes_something_else_has_a_low_snr_and_cosine():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 896, 1))
    assert output_fidelity(ref + rng.normal(scale=0.01, size=ref.shape), ref)["snr_db"] > 35
    noise = output_fidelity(rng.normal(size=ref.shape), ref)
    assert noise["snr_db"] < 1 and abs(noise["cosine"]) < 0.2


def test_outputs_that_do_not_match_the_reference_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        fidelity({"a": np.zeros((2, 3))}, {"b": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="shape"):
        fidelity({"a": np.zeros((2, 3))}, {"a": np.zeros((2, 4))})


def test_nan_outputs_are_never_a_perfect_fidelity():
    """NaN against NaN used to read as identical (200 dB): every figure is refused, the output named."""
    nan = np.full((2, 3), np.nan)
    with pytest.raises(ValueError, match=r"output 'y': the reference holds NaN or infinity \(first at sample 0\)"):
        fidelity({"y": nan}, {"y": nan})
    broken = np.zeros((2, 3))
    broken[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"the output holds NaN or infinity \(first at sample 1\)"):
        output_fidelity(broken, np.ones((2, 3)))


def test_a_sample_of_the_wrong_size_names_the_input():
    from device_agents.inference import ModelRunner

    class Interp:  # the smallest interpreter surface: one float input [1, 4], one output
        def get_input_details(self):
            return [{"index": 0, "name": "x", "shape": [1, 4], "dtype": np.float32}]

        def get_output_details(self):
            return [{"index": 1, "name": "y", "shape": [1, 4], "dtype": np.float32}]

    with pytest.raises(ValueError, match=r"input 'x': a sample of shape \[2, 2, 2\], the model takes \[4\]"):
        ModelRunner(Interp()).tensors({"x": np.zeros((1, 2, 2, 2), np.float32)}, 0)


def test_a_scalar_output_is_refused_when_the_runner_is_made():
    """A 0-d output (a reduce_sum without keepdims) loaded and then failed every request with numpy's
    'invalid index to scalar variable'; it is refused when the model is loaded (the install's smoke check)."""
    from device_agents.inference import ModelRunner

    class Interp:
        def get_input_details(self):
            return [{"index": 0, "name": "x", "shape": [1, 4], "dtype": np.float32}]

        def get_output_details(self):
            return [{"index": 1, "name": "total", "shape": [], "dtype": np.float32},
                    {"index": 2, "name": "y", "shape": [1, 4], "dtype": np.float32}]

    with pytest.raises(ValueError, match=r"output 'total' is a scalar \(0-d\); the agent returns each output with a batch axis"):
        ModelRunner(Interp())


def test_a_timed_run_is_the_invoke_alone_not_setting_its_eval_sample(digits_artifacts, monkeypatch):
    """The record says "time.perf_counter_ns around interpreter.invoke()" (docs/agent.md: each run is one invoke());
    with an eval set of several samples, each timed run also set that sample's input tensors."""
    import time

    from device_agents import bench
    from edgekit_protocol.config import BenchSettings

    real = bench.get_runtime

    class SlowToSet:  # the real interpreter, whose set_tensor takes 5 ms
        def __init__(self, inner):
            self._inner = inner

        def set_tensor(self, index, value):
            time.sleep(0.005)
            self._inner.set_tensor(index, value)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    class Runtime:
        def __init__(self, inner):
            self.inner, self.key = inner, inner.key

        def version(self):
            return self.inner.version()

        def interpreter(self, *args, **kwargs):
            return SlowToSet(self.inner.interpreter(*args, **kwargs))

    monkeypatch.setattr(bench, "get_runtime", lambda *a, **k: Runtime(real(*a, **k)))
    record = bench.run_bench(digits_artifacts / "fp32.tflite", BenchSettings(warmup=0, min_runs=9, max_runs=9, min_seconds=0),
                             eval_file=digits_artifacts / "eval.npz")
    assert record["inputs"] == "eval set" and record["runs"] == 9
    assert record["latency_ms"]["p50"] < 5, record["latency_ms"]
