"""An ai-edge-quantizer that is installed but cannot be imported: older than pyproject's floor (no
``utils.qsv_utils`` before 0.7) or beside a numpy it cannot use (it reads ``np._typing``, absent before 1.25). The
first said "needs ai-edge-quantizer" although it was installed; the second ended the compile in a traceback."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edge_kit.compiler.convert import quantize_tflite
from edge_kit.compiler.onnx_source import version
from edge_kit.errors import CompileError


@pytest.fixture
def fake_quantizer(tmp_path, monkeypatch):
    """Return a function that makes ``import ai_edge_quantizer`` load the package written from ``files``."""

    def install(files: dict[str, str]):
        for name in [m for m in sys.modules if m == "ai_edge_quantizer" or m.startswith("ai_edge_quantizer.")]:
            monkeypatch.delitem(sys.modules, name)
        for rel, text in files.items():
            path = tmp_path / "site" / "ai_edge_quantizer" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))

    return install


def unusable(variant: str, why: str) -> str:
    return (f"variant {variant}: ai-edge-quantizer {version('ai-edge-quantizer')} with numpy {np.__version__} cannot be "
            f"imported ({why}); pip install -U 'edge-kit[host]' for the versions it needs")


def test_a_quantizer_older_than_the_floor_is_named_as_such_not_as_missing(fake_quantizer):
    fake_quantizer({name: "" for name in ("__init__.py", "calibrator.py", "qtyping.py", "quantizer.py", "recipe.py",
                                          "recipe_manager.py", "utils/__init__.py")})  # 0.6: no utils/qsv_utils.py
    with pytest.raises(CompileError) as raised:
        quantize_tflite(b"model", "float16", None, variant="fp16")
    text = str(raised.value)
    head, tail = unusable("fp16", "\0").split("\0")
    assert text.startswith(head + "cannot import name 'qsv_utils' from 'ai_edge_quantizer.utils'") and text.endswith(tail)
    assert "\n" not in text


def test_a_quantizer_that_breaks_on_the_installed_numpy_is_one_line_not_a_traceback(fake_quantizer):
    fake_quantizer({"__init__.py": "raise AttributeError(\"module 'numpy' has no attribute '_typing'\")\n"})
    with pytest.raises(CompileError) as raised:
        quantize_tflite(b"model", "int8", {"x": np.zeros((1, 2), np.float32)}, variant="int8")
    assert str(raised.value) == unusable("int8", "module 'numpy' has no attribute '_typing'")


def test_no_quantizer_at_all_still_says_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)
    with pytest.raises(CompileError, match=r"^variant int8: quantizing a \.tflite needs ai-edge-quantizer "
                                           r"\(pip install 'edge-kit\[host\]'\)$"):
        quantize_tflite(b"model", "int8", None, variant="int8")
