"""The artifact manifest: what was built for which profile, and every figure measured about it.

``artifacts/<model>/manifest.json`` is written last and atomically by the compiler, so a folder with
a manifest is complete. Each figure says how it was obtained in a ``method`` field: counted from the
file, measured with the LiteRT interpreter on the host, or reported by ``edgetpu_compiler``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from edge_kit.errors import EdgeKitError, InputError
from edgekit_protocol.desired import MAX_ARTIFACT_BYTES
from edgekit_protocol.messages import check_model_name, nested_deeper

SCHEMA = "edgekit.manifest/2"
Status = Literal["built", "not-built", "failed"]


MAX_DEPTH = 64  # how deep a manifest's arrays and objects may nest (a compile's nest 6 deep)
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # what the compiler writes: <id>.tflite, eval.npz


def _file_name(value: Any) -> Any:
    """Return ``value`` when it is None or a bare file name inside the artifacts folder.

    Readers join it to the folder (deploy uploads that file, publish copies it), so a path such as
    ``../../etc/passwd`` or ``/root/.ssh/id_rsa`` in an edited or foreign manifest must not validate.

    Raises:
        ValueError: a path, an absolute path, a hidden name or one with other characters.
    """
    if value is not None and not (isinstance(value, str) and _FILE_NAME.fullmatch(value)):
        raise ValueError(f"file {value!r} is not a file name inside the artifacts folder (letters, digits, '.', '_', "
                         "'-'; no path); compile again")
    return value


def _size(value: Any) -> Any:
    """Return ``value`` when it is None or a size in bytes: a whole number from 0 to below
    :data:`~edgekit_protocol.desired.MAX_ARTIFACT_BYTES` (1 TiB, what a desired state takes).

    Readers copy a manifest's sizes into the store's index, progress bars and Content-Length checks, so a negative,
    fractional, quoted or true one in an edited manifest must not validate (pydantic read ``"12"`` and true as ints).

    Raises:
        ValueError: anything else, its value named (clipped).
    """
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                  and 0 <= value < MAX_ARTIFACT_BYTES):
        raise ValueError(f"{value!r:.40} is not a size in bytes (a whole number below 1 TiB); compile the model again")
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
    inputs: str | None = None  # which data file (or which random samples) fed both models
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
    # how each figure above that has no method of its own was obtained, keyed by field: bytes, gzip_bytes, precision,
    # op_histogram, weights, sparsity, macs, macs_nonzero, build_seconds (absent in a manifest from before it was
    # recorded: readers say "not recorded")
    methods: dict[str, str] | None = None
    warnings: list[str] = []  # e.g. fidelity below a profile's min_fidelity_snr_db

    _file = field_validator("file")(_file_name)
    _sizes = field_validator("bytes", "gzip_bytes", mode="before")(_size)

    @field_validator("calibration_table")
    @classmethod
    def _table_file(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        _file_name((value or {}).get("file"))
        _size((value or {}).get("bytes"))
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
    # Ed25519 signature (edgekit sign, compile --sign-key) over every other field, as messages are signed
    key_id: str | None = None
    sig: str | None = None
    _signature: str = PrivateAttr(default="not checked")  # what read_manifest found (see ArtifactTrust)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Return ``value`` when its ``name`` is a model name (every reader names folders, store paths and desired
        states with it).

        Raises:
            ValueError: no name, or not a model name (:func:`edgekit_protocol.messages.check_model_name`).
        """
        if value.get("name") is None:  # check_model_name would say "model name None"
            raise ValueError("name is missing; compile the model again with --name NAME")
        try:
            check_model_name(value.get("name"))
        except ValueError as exc:
            raise ValueError(f"{exc}; compile the model again with --name NAME") from None
        return value

    @field_validator("eval")
    @classmethod
    def _eval_file(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        _file_name((value or {}).get("file"))
        return value

    def artifact(self, variant_id: str) -> Artifact | None:
        """Return the artifact with this variant id, or None."""
        return next((a for a in self.artifacts if a.id == variant_id), None)

    @property
    def reference_id(self) -> str:
        """Return the id of the variant the others' fidelity is measured against, whose accuracy theirs is a ratio of
        and whose outputs the eval set ships: ``eval.reference`` when recorded, else ``onnx-fp32`` for an ONNX source
        whose fp32 was not built (onnx2tf could not convert it, or no profile asked a LiteRT variant) while onnx-fp32
        was, else ``fp32``."""
        if self.eval and self.eval.get("reference"):
            return str(self.eval["reference"])
        fp32, onnx = self.artifact("fp32"), self.artifact("onnx-fp32")
        if self.model.get("format") == "onnx" and (fp32 is None or fp32.status != "built") \
                and onnx is not None and onnx.status == "built":
            return "onnx-fp32"
        return "fp32"

    def reference(self) -> Artifact | None:
        """Return the artifact of :attr:`reference_id`, or None."""
        return self.artifact(self.reference_id)

    @property
    def signature(self) -> str:
        """Return what :func:`read_manifest` found of its signature: who signed it and whether that key
        is trusted, ``unsigned``, or ``not checked`` (read without an :class:`ArtifactTrust`)."""
        return self._signature

    def to_json(self, signer: Any = None) -> str:
        """Return the manifest as indented JSON (``schema`` spelled without the trailing underscore),
        signed by ``signer`` (a :class:`device_agents.identity.Signer`) when given, else as it is."""
        data = self.model_dump(mode="json", by_alias=True)
        data = {"schema": data.pop("schema_"), **data}
        for key in ("key_id", "sig"):
            if data[key] is None or signer is not None:
                data.pop(key)
        if signer is not None:
            signer.sign(data)
        return json.dumps(data, indent=2) + "\n"


@dataclass(frozen=True)
class ArtifactTrust:
    """The keys whose manifest signatures a fleet trusts, and whether it takes only signed manifests
    (``required``: its fleet file lists ``artifact_keys``)."""

    keys: tuple[bytes, ...] = ()
    required: bool = False

    def check(self, data: dict[str, Any], path: Path) -> str:
        """Return who signed the manifest ``data`` (as read from ``path``): ``signed by key K (trusted)``,
        ``unsigned``, or, when nothing is required, ``signed by key K, not checked`` for a key not trusted
        (``signed without a key_id, not checked`` for a sig naming no key).

        Raises:
            InputError: unsigned, signed by a key not trusted or by none named where signatures are required, or a
                signature by a trusted key that does not verify (the manifest changed since).
        """
        from device_agents.identity import OPERATOR, Keyring, key_id

        kid = data.get("key_id")
        known = ", ".join(key_id(k) for k in self.keys) or "none"
        how = f"sign it with a trusted key: edgekit sign {path.parent} --key KEY"
        if kid is None and data.get("sig") is None:
            if self.required:
                raise InputError(f"{path}: not signed, and this fleet takes only signed manifests (keys it trusts: "
                                 f"{known}, its artifact_keys and operator key); {how}")
            return "unsigned"
        if kid is None:  # a sig that names no key: whose it is cannot even be said
            if self.required:
                raise InputError(f"{path}: its sig names no key (no key_id), and this fleet takes only manifests "
                                 f"signed by a key it trusts ({known}); {how}")
            return "signed without a key_id, not checked"
        key = next((k for k in self.keys if key_id(k) == kid), None)
        if key is None:
            if self.required:
                raise InputError(f"{path}: signed by key {str(kid)[:20]!r}, which this fleet does not trust (it "
                                 f"trusts {known}); add its public key to artifact_keys, or {how}")
            return f"signed by key {str(kid)[:20]}, not checked (not a key this fleet trusts)"
        try:
            Keyring(operators=[key]).verify(data, OPERATOR)
        except EdgeKitError:
            raise InputError(f"{path}: its signature by key {kid} does not verify: the manifest changed after it "
                             "was signed; compile or sign it again") from None
        return f"signed by key {kid} (trusted)"


def read_manifest(folder: Path, trust: ArtifactTrust | None = None) -> Manifest:
    """Return the manifest in ``<folder>/manifest.json``, ``folder`` being one compiled model's folder
    (``OUT/<model>``, what ``edgekit compile`` writes); with ``trust``, its signature checked on the
    very bytes parsed (:attr:`Manifest.signature` says what was found).

    Raises:
        InputError: no such folder, or not a folder; no manifest (the folder is not a finished compile, or it
            is the ``--out`` folder holding compiled models, which are named); it is not UTF-8 JSON (or nested too
            deeply to read), or not a JSON object; it does not validate, lists a variant twice or a built one without
            its file or sha256; or its signature fails ``trust`` (:meth:`ArtifactTrust.check`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; give the compiled "
                         "model's folder (artifacts/<model>)")
    path = folder / "manifest.json"
    deep = False
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
    except RecursionError:  # arrays or objects nested thousands deep: valid JSON, no manifest
        deep = True
    if deep or (isinstance(data, (dict, list)) and nested_deeper(data, MAX_DEPTH)):  # hundreds deep would still end signing, checking or validating in a RecursionError
        raise InputError(f"{path}: unreadable manifest (nested more than {MAX_DEPTH} deep); compile the model again "
                         "with `edgekit compile`") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(data), "a number")
        raise InputError(f"{path}: not a manifest (its JSON is {kind}, not an object); compile the model again with "
                         "`edgekit compile`")
    if data.get("schema") != SCHEMA:
        raise InputError(f"{path}: schema is {data.get('schema')!r}, expected {SCHEMA!r}; compile the model again with this edge-kit")
    signature = trust.check(data, path) if trust is not None else "not checked"
    data = {**data, "schema_": data["schema"]}
    del data["schema"]
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}") from None
    _check_built(manifest, path)
    manifest._signature = signature
    return manifest


def _check_built(manifest: Manifest, path: Path) -> None:
    """Return None when every variant id of ``manifest`` (read from ``path``) is listed once and every built one names
    its file and sha256, as a compile writes them.

    Raises:
        InputError: a variant listed twice (which one a device gets, publish stores or select picks would be
            a guess), or a built one without a file or sha256 (then nothing, neither this host nor a device, could
            check the bytes installed against what the manifest vouches for; publish skipped it): named.
    """
    seen: set[str] = set()
    for i, art in enumerate(manifest.artifacts):
        if art.id in seen:
            raise InputError(f"{path}: artifacts.{i}.id: variant {art.id} is listed twice; compile the model again")
        seen.add(art.id)
        if art.status == "built" and (not art.file or not art.sha256):
            raise InputError(f"{path}: {art.id} is built but names no {'file' if not art.file else 'sha256'}, so "
                             "nothing could check what a device installs; compile the model again")


def sign_manifest(folder: Path, signer: Any) -> Manifest:
    """Sign ``<folder>/manifest.json`` with ``signer`` (a :class:`device_agents.identity.Signer`) in place,
    replacing any signature it had; return the manifest read back.

    Raises:
        InputError: as :func:`read_manifest`, or it holds NaN or an infinity (no JSON form a signature
            can cover; the field named): nothing is written then. OSError: it cannot be written.
    """
    from edge_kit.fsutil import atomic_write_text

    manifest = read_manifest(folder)
    bad = _non_finite(manifest.model_dump(mode="json", by_alias=True))
    if bad is not None:
        raise InputError(f"{Path(folder) / 'manifest.json'}: {bad} is NaN or an infinity, which a signature cannot "
                         "cover (JSON has no such number); compile the model again")
    atomic_write_text(Path(folder) / "manifest.json", manifest.to_json(signer))
    return read_manifest(folder, ArtifactTrust((signer.public,)))


def _non_finite(value: Any, where: str = "") -> str | None:
    """Return the dotted path of the first NaN or infinity in the JSON-ready ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "a value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None

