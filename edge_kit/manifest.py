"""The artifact manifest: what was built for which profile, and every figure measured about it.

``artifacts/<model>/manifest.json`` is written last and atomically by the compiler, so a folder with
a manifest is complete. Each figure says how it was obtained in a ``method`` field: counted from the
file, measured with the LiteRT interpreter on the host, or reported by ``edgetpu_compiler``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from edge_kit.errors import InputError

SCHEMA = "edgekit.manifest/2"
Status = Literal["built", "not-built", "failed"]


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # what the compiler writes: <id>.tflite, eval.npz


def _file_name(value: Any) -> Any:
    """Return ``value`` when it is None or a bare file name inside the artifacts folder.

    Readers join it to the folder (deploy uploads that file, publish copies it), so a path such as
    ``../../etc/passwd`` or ``/root/.ssh/id_rsa`` in an edited or foreign manifest must not validate.

    Raises:
        ValueError: a path, an absolute path, a hidden name or one with other characters.
    """
    if value is not None and not (isinstance(value, str) and _FILE_NAME.match(value)):
        raise ValueError(f"file {value!r} is not a file name inside the artifacts folder (letters, digits, '.', '_', "
                         "'-'; no path); compile again")
    return value


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Accuracy(_Record):
    measured: bool
    task: str | None = None  # the metric plugin (device_agents.metrics) or "custom"
    metric: str | None = None  # the headline figure's name, e.g. top1, map, miou, pck
    value: float | None = None  # the headline figure (higher is better)
    figures: dict[str, float] | None = None  # every figure the metric gave
    samples: int | None = None
    method: str  # how it was measured, or why it was not


class Fidelity(_Record):
    measured: bool
    snr_db: float | None = None  # worst output's SNR against fp32 (device_agents.inference.output_fidelity)
    cosine: float | None = None  # worst output's mean cosine similarity
    top1_agreement: float | None = None  # worst class output's argmax agreement, when an output is a class vector
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    outputs: dict[str, dict[str, float]] | None = None  # the same figures for each output
    samples: int | None = None
    inputs: str | None = None  # which data file fed both models
    method: str


class Artifact(_Record):
    id: str
    status: Status
    reason: str | None = None  # why not built / failed
    profiles: list[str]
    summary: str
    precision: str
    pruning: str | None = None
    sparsity_requested: float = 0.0
    file: str | None = None
    runtime: str = "litert"  # the device runtime that runs it: litert, onnxruntime or tensorrt (edge_kit.variants)
    built_on_device: bool = False  # the device builds what it runs from this file (a TensorRT engine, at install)
    calibration_table: dict[str, Any] | None = None  # trt-int8: file, sha256, bytes, method of the shipped table
    derived_from: str | None = None  # how it was made: converter, quantizer, compiler, "source as is"
    sha256: str | None = None
    bytes: int | None = None
    gzip_bytes: int | None = None
    sparsity: float | None = None  # measured share of zero weights in MAC ops
    macs: int | None = None
    macs_nonzero: int | None = None
    weights: int | None = None
    op_histogram: dict[str, int] | None = None
    inputs: list[dict[str, Any]] | None = None  # name, shape, dtype, quantization, as the agent names them
    outputs: list[dict[str, Any]] | None = None
    accelerators: dict[str, Any] | None = None
    accuracy: Accuracy | None = None
    fidelity: Fidelity | None = None
    fine_tuned: dict[str, Any] | None = None
    build_seconds: float | None = None  # wall clock on the host (time.perf_counter)
    warnings: list[str] = []  # e.g. fidelity below a profile's min_fidelity_snr_db

    _file = field_validator("file")(_file_name)

    @field_validator("calibration_table")
    @classmethod
    def _table_file(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        _file_name((value or {}).get("file"))
        return value


class Manifest(_Record):
    schema_: str = SCHEMA
    created: str
    model: dict[str, Any]
    calibration: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    versions: dict[str, str | None]
    profiles: dict[str, dict[str, Any]]
    artifacts: list[Artifact]

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("eval")
    @classmethod
    def _eval_file(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        _file_name((value or {}).get("file"))
        return value

    def artifact(self, variant_id: str) -> Artifact | None:
        """Return the artifact with this variant id, or None."""
        return next((a for a in self.artifacts if a.id == variant_id), None)

    def to_json(self) -> str:
        """Return the manifest as indented JSON (``schema`` spelled without the trailing underscore)."""
        data = self.model_dump(mode="json", by_alias=True)
        data = {"schema": data.pop("schema_"), **data}
        return json.dumps(data, indent=2) + "\n"


def read_manifest(folder: Path) -> Manifest:
    """Return the manifest in ``<folder>/manifest.json``, ``folder`` being one compiled model's folder
    (``OUT/<model>``, what ``edgekit compile`` writes).

    Raises:
        InputError: no such folder, or not a folder; no manifest (the folder is not a finished compile, or it
            is the ``--out`` folder holding compiled models, which are named); it is not UTF-8 JSON, or not a JSON
            object; or it does not validate.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; give the compiled "
                         "model's folder (artifacts/<model>)")
    path = folder / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        models = sorted(p.parent.name for p in folder.glob("*/manifest.json"))
        if models:  # the compile's --out folder: one compiled model per subfolder
            raise InputError(f"{path}: no manifest; {folder} holds compiled models ({', '.join(models)}): give one "
                             f"model's folder, e.g. {folder / models[0]}") from None
        raise InputError(f"{path}: no manifest; run `edgekit compile` into {folder} first") from None
    except (OSError, ValueError) as exc:  # ValueError: not JSON (JSONDecodeError), or not UTF-8 text
        raise InputError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(data), "a number")
        raise InputError(f"{path}: not a manifest (its JSON is {kind}, not an object); compile the model again with "
                         "`edgekit compile`")
    if data.get("schema") != SCHEMA:
        raise InputError(f"{path}: schema is {data.get('schema')!r}, expected {SCHEMA!r}; compile the model again with this edge-kit")
    data["schema_"] = data.pop("schema")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}") from None
