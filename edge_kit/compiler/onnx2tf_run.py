"""The child process that converts one prepared ONNX model to a float32 ``.tflite`` with onnx2tf.

Run by :func:`edge_kit.compiler.onnx_source.convert` as a script, by its path (it imports nothing of edge-kit):
``python onnx2tf_run.py MODEL.onnx OUT.tflite [INPUT NAME...]``, each input name kept in its ONNX layout
(onnx2tf's ``-kat``). Exit 0 with ``OUT.tflite`` written; otherwise onnx2tf's own messages or the traceback on
stderr, which the caller reads for the op that failed.

onnx2tf builds a Keras model op by op. Its command line then saves that model three times: a SavedModel (``-osd``),
and one ``.tflite`` per precision through ``TFLiteConverter.from_keras_model``, which first serialises every Keras
layer's configuration into a SavedModel of its own. For YOLOv8n that took 49 of the conversion's 71 s on a 2-core
host, for files edge-kit never reads (the SavedModel, the float16 ``.tflite``). Here onnx2tf only builds the model
(``disable_model_save``); one SavedModel of a plain ``tf.Module`` holding the model's variables and its call as
the ``serving_default`` signature is written and converted with onnx2tf's own converter settings (TFLite builtins
and select TensorFlow ops, batch matmuls not unfolded), which is what ``from_keras_model`` does after its
serialisation: the same graph, in 22 s for YOLOv8n. Where that SavedModel cannot be written or converted, the traced
call is converted as a concrete function, as onnx2tf falls back to when ``from_keras_model`` fails.
"""

from __future__ import annotations

import os
import sys
import tempfile

if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]  # run by path: this folder's modules (convert.py, watch.py...) must not shadow what TF imports


def main(argv: list[str]) -> int:
    """Convert ``argv[0]`` (an ONNX file) to the float32 ``.tflite`` ``argv[1]``, inputs ``argv[2:]`` kept in their
    ONNX layout. Returns 0; raises what onnx2tf or TensorFlow raise (the process then exits 1 with the traceback),
    and onnx2tf exits 1 itself on an op it cannot convert (its message on stdout)."""
    import onnx2tf
    import tensorflow as tf

    source, target, keep = argv[0], argv[1], argv[2:]
    with tempfile.TemporaryDirectory(prefix="onnx2tf-") as work:
        model = onnx2tf.convert(input_onnx_file_path=source, output_folder_path=work, non_verbose=True,
                                keep_shape_absolutely_input_names=keep or None, disable_model_save=True)
        module = tf.Module()
        module.serve = tf.function(lambda *inputs: model(inputs),
                                   input_signature=[tf.TensorSpec(t.shape, t.dtype, t.name) for t in model.inputs])
        traced = module.serve.get_concrete_function()
        # every variable the call captures, tracked so the SavedModel holds it (some ops make their own, outside the
        # Keras layers' weights); no Keras layer is serialised
        module.weights = list({id(v): v for v in [*model.variables, *traced.variables]}.values())
        saved = f"{work}/saved_model"
        try:
            tf.saved_model.save(module, saved, signatures={"serving_default": traced})
            flatbuffer = _converted(tf, tf.lite.TFLiteConverter.from_saved_model(saved))
        except Exception as exc:  # noqa: BLE001 - as onnx2tf does when its SavedModel route fails: the traced call
            print(f"edgekit: the SavedModel route failed ({type(exc).__name__}: {exc}); converting the traced "
                  "function instead", file=sys.stderr)
            flatbuffer = _converted(tf, tf.lite.TFLiteConverter.from_concrete_functions([traced], module))
    with open(target, "wb") as f:
        f.write(flatbuffer)
    return 0


def _converted(tf, converter):  # noqa: ANN001, ANN202 - TensorFlow's module and converter
    """Return ``converter``'s flatbuffer with onnx2tf's own settings: TFLite builtins and select TensorFlow ops,
    batch matmuls not unfolded (no ``--enable_batchmatmul_unfold``). Raises what the converter raises."""
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.unfold_batchmatmul = False
    return converter.convert()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
