"""Model commands of the `edgekit` CLI: compile, example, profiles."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_kit.cli.app import (
    JsonOpt,
    app,
    bounded,
    emit_json,
    interrupts_held,
    out,
    print_whole,
    progress_bar,
    safe,
    spinner,
    write_whole,
)
from edgekit_protocol.labels import accuracy_text, printable

profiles_app = typer.Typer(no_args_is_help=True, help="List, show and check device profiles.")
app.add_typer(profiles_app, name="profiles")


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:,.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%".replace(".0%", "%")


def _accel_cell(a: Any, footnote: Any) -> str:
    """Return the accelerator-ops cell; a CPU fallback's reason goes to a footnote."""
    cells = []
    for name, check in sorted((a.accelerators or {}).items()):
        if name == "edgetpu_compiler":
            ops = check.get("ops", [])
            mapped = check.get("ops_mapped", sum(o["count"] for o in ops if o["mapped"]))  # from its summary lines
            total = check.get("ops_total", sum(o["count"] for o in ops))  # (manifests before them: its op table)
            cells.append(f"tpu* {'?' if mapped is None else mapped}/{'?' if total is None else total}")
            continue
        text = f"{'tpu' if name == 'edgetpu' else name} {check['ops_mapped']}/{check['ops_total']}"
        first = check.get("first_fallback")
        if first:
            label = footnote(f"{a.id}: the Edge TPU hands over to the CPU at op #{first['index']} "
                             f"{first['op']}: {first['reason']}")
            text += f" (CPU from {first['op']}, see {label})"
        cells.append(text)
    return " ".join(cells) or "-"


def _host_runtimes(manifest: Any) -> list[str]:
    """Return the runtimes, with their versions, that ran the manifest's built variants on this host (``LiteRT 2.3.0``,
    ``ONNX Runtime 1.32.0``): ONNX Runtime alone for an ONNX model compiled for ONNX Runtime variants alone."""
    used = {a.runtime for a in manifest.artifacts if a.status == "built" and not a.built_on_device}
    return [f"{name} {manifest.versions.get(key)}" for runtime, name, key in
            (("litert", "LiteRT", "ai_edge_litert"), ("onnxruntime", "ONNX Runtime", "onnxruntime")) if runtime in used]


def _compile_report(manifest: Any) -> tuple[Table, list[str]]:
    """Return the variant table and the lines printed under it (numbered footnotes first)."""
    from edge_kit.compiler.data import is_random

    fp32 = manifest.reference()  # fp32, or onnx-fp32 for an ONNX model onnx2tf could not convert
    base_gzip = fp32.gzip_bytes if fp32 and fp32.gzip_bytes else None
    base_macs = fp32.macs if fp32 and fp32.macs else None
    t = Table(title=f"{safe(manifest.model['name'])}: one row per distinct variant", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    scored = next((a.accuracy.metric for a in manifest.artifacts if a.accuracy and a.accuracy.measured), None)
    metric = scored or "accuracy"
    for col in ("variant", "runtime", "KiB", "gzip×", "sparse", "MACs×", metric, "SNR dB", "accelerator ops"):
        t.add_column(col, justify="left" if col in ("variant", "runtime", "accelerator ops") else "right",
                    no_wrap=col != "accelerator ops")
    footnotes: list[str] = []

    def footnote(text: str) -> str:
        footnotes.append(f"[{len(footnotes) + 1}] {text}")
        return f"[{len(footnotes)}]"

    for a in manifest.artifacts:
        if a.status != "built":
            label = footnote(safe(f"{a.id} {a.status}: {a.reason}"))
            color = "red" if a.status == "failed" else "yellow"
            t.add_row(safe(a.id), safe(a.runtime), *[""] * 6, f"[{color}]{a.status}, see {label}[/]")
            continue
        acc = a.accuracy.value if a.accuracy and a.accuracy.measured else None
        fid = a.fidelity if a.fidelity and a.fidelity.measured else None
        on_device = None
        if a.built_on_device:  # the host cannot run what the device builds: no figure is printed for it
            why = a.accuracy.method if a.accuracy else "not measured on host"
            seen = next((i + 1 for i, f in enumerate(footnotes) if f.endswith(f"] {why}")), None)
            on_device = f"on device {f'[{seen}]' if seen else footnote(why)}"  # one footnote for every trt-* row
        t.add_row(
            safe(a.id), safe(a.runtime), _kb(a.bytes),
            f"{a.gzip_bytes / base_gzip:.2f}" if base_gzip and a.gzip_bytes else "-",
            _pct(a.sparsity),
            f"{a.macs / base_macs:.2f}" if base_macs and a.macs is not None else "-",
            on_device or accuracy_text(acc, 1), on_device or (f"{fid.snr_db:.1f}" if fid and fid.snr_db is not None else "-"),
            _accel_cell(a, footnote),
        )
        for warning in a.warnings:
            footnote(f"[yellow]{safe(warning)}[/]")
    notes = [_profile_note(name, p, manifest) for name, p in manifest.profiles.items()]
    conv = manifest.model.get("conversion")
    if conv:
        notes.append(f"    ONNX source: {conv['converter']} {conv['converter_version']} made fp32; worst output "
                     f"{conv['snr_db']:.1f} dB from {conv['reference']} {conv['reference_version']} (max abs error "
                     f"{conv['max_abs_error']:.3g}) on {conv['inputs']}")
    on_random = next((a.fidelity.inputs for a in manifest.artifacts if a.fidelity and is_random(a.fidelity.inputs)), None)
    notes.append(f"    × = ratio to {manifest.reference_id}; sizes, sparsity and MACs counted from each file (which ops, "
                 "what is left out: each artifact's `methods` in manifest.json); "
                 + (f"{metric} (on --eval) and SNR" if scored else "accuracy not measured (no --eval scored a variant); SNR")
                 + f" against {manifest.reference_id} (worst output) "
                 + (f"on {on_random.split(':')[0]}, a check that is no figure of real inputs (selection never uses it), "
                    if on_random else "")
                 + f"measured on this host with each variant's runtime ({', '.join(_host_runtimes(manifest))}"
                 + "); accel ops = ops the accelerator a profile's LiteRT delegate runs on (runtime.delegate) takes "
                 "by its documented rules (tpu* = edgetpu_compiler's own count; - : no profile of the variant runs it "
                 "on an accelerator's LiteRT delegate)")
    return t, footnotes + notes


def _profile_note(name: str, profile: dict[str, Any], manifest: Any) -> str:
    """Return the line under the compile table for profile ``name``: its accelerator and the variants its devices get
    (built), then those of its list this compile did not build (each one's reason is a footnote), so a variant listed
    is never read as deployable when it was not built. Raises nothing."""
    built = {a.id for a in manifest.artifacts if a.status == "built"}
    got = [v for v in profile["variants"] if v in built]
    missing = [v for v in profile["variants"] if v not in built]
    text = f"    profile {name} (accelerator: {profile['accelerator']}{_unused_by_litert(profile)}): " \
           f"{', '.join(got) or 'nothing built'}"
    return text + (f"; not built: {', '.join(missing)}" if missing else "")


def _unused_by_litert(profile: dict[str, Any]) -> str:
    """Return what the profile's accelerator is used through when its LiteRT delegate (``runtime.delegate``, in the
    manifest since this field was recorded) is not that accelerator's, so no op count is shown for it: e.g. a Jetson's
    gpu, reached through TensorRT while LiteRT runs on xnnpack (said only when it has LiteRT variants); else "".
    Raises nothing."""
    from device_agents.targets import TARGETS
    from edge_kit.variants import parse_variant

    acc, delegate = profile.get("accelerator"), profile.get("delegate")
    target = TARGETS.get(delegate or "")
    if acc in (None, "none") or target is None or target.accelerator == acc:
        return ""
    runtimes = {parse_variant(v).runtime for v in profile.get("variants", ())}
    others = sorted(runtimes - {"litert"})
    said = [f"used through {', '.join(others)} on the device"] if others else []
    if "litert" in runtimes:
        said.append(f"its LiteRT variants run on {delegate}, the CPU, so no {acc} ops are counted")
    return f", {'; '.join(said)}" if said else ""


def unserved_profiles(manifest: Any) -> list[str]:
    """Return one warning per profile of ``manifest`` none of whose variants was built (not-built or failed: e.g.
    coral-usb without --calib), naming the variants; its devices get nothing from this compile. Raises nothing."""
    built = {a.id for a in manifest.artifacts if a.status == "built"}
    return [f"profile {name}: none of its variants was built ({', '.join(p['variants'])}: each one's reason is under "
            "the table and in manifest.json); deploy, tune and rollouts give its devices nothing from this compile"
            for name, p in manifest.profiles.items() if p.get("variants") and not built & set(p["variants"])]


@app.command("compile")
def compile_cmd(
    model: Annotated[Path, typer.Argument(help="Keras .keras/.h5 file, SavedModel folder, .tflite or .onnx file.")],
    profile: Annotated[list[str], typer.Option("--profile", "-p", help="Bundled profile name or profile YAML path; repeat for several.")],
    calib: Annotated[Optional[Path], typer.Option(help=".npz with x (or x.<input> per input): real inputs for int8 calibration.")] = None,
    eval: Annotated[Optional[Path], typer.Option("--eval", help=".npz with inputs and labels (y / y.<key>, per --task): accuracy and fidelity.")] = None,
    train: Annotated[Optional[Path], typer.Option(help=".npz with x and y: fine-tune after pruning.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Artifacts go to OUT/<model name>/.")] = Path("artifacts"),
    name: Annotated[Optional[str], typer.Option("--name", help="The model's name (OUT/<name>, the store's manifests/<name>/): "
                                                 "1-128 letters, digits, '_', '.', '-'. Default: the model file's name "
                                                 "without its suffix.")] = None,
    epochs: Annotated[int, typer.Option(min=0, help="Fine-tuning epochs after pruning (with --train).")] = 3,
    task: Annotated[Optional[str], typer.Option(help="Accuracy metric: classification (default), detection, segmentation, keypoints, regression.")] = None,
    task_option: Annotated[list[str], typer.Option("--task-option", help="KEY=VALUE for the task metric, e.g. output=scores or alpha=0.05; repeatable.")] = [],
    metric: Annotated[Optional[str], typer.Option(help="module.py:function scoring outputs against labels itself (shipped to devices).")] = None,
    decode: Annotated[Optional[str], typer.Option(help="module.py:function turning detection outputs into boxes, scores, classes.")] = None,
    input_shape: Annotated[list[str], typer.Option("--input-shape", help="NAME=1xHxWxC pins an input's dynamic dimensions (ONNX: its own layout, e.g. 1x3x224x224); repeatable.")] = [],
    sign_key: Annotated[Optional[Path], typer.Option("--sign-key", help="Ed25519 private key (PEM, e.g. a fleet's keys/operator.key) that signs manifest.json.")] = None,
    timeout: Annotated[Optional[float], typer.Option(**bounded("Seconds each run of a model over the --eval (else --calib) inputs may take; it runs in a child process, killed then (default: 120 + 1 per sample). Also the deadline of each int8 calibration, of each fine-tuning epoch and of TensorFlow's loading of the model, and, 5 times it plus 1 s per MiB of the model, of each conversion step in the compiling process; these stop the compile (exit 2).", 1, 86400))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build every variant the profiles ask for (each once), measure it, and write manifest.json."""
    from device_agents.identity import Signer
    from edge_kit.compiler.pipeline import CompileRequest, compile_model, plan_steps
    from edge_kit.compiler.sources import parse_input_shapes
    from edge_kit.compiler.watch import (
        StoppedAfterResult,
        interrupts_after_result_stop,
        note,
    )
    from edge_kit.errors import InputError
    from edge_kit.profiles import load_profile

    profiles = [load_profile(p) for p in profile]
    signer = Signer.load(sign_key) if sign_key is not None else None  # before the compile: a bad key fails at once
    options = {}
    for item in task_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--task-option {item}: give KEY=VALUE, e.g. output=scores")
        options[key] = value  # each task converts and checks its own options
    req = CompileRequest(model=model, profiles=profiles, out=out_dir, calib=calib, eval=eval, train=train,
                         epochs=epochs, task=task, task_options=options, metric=metric, decode=decode,
                         input_shapes=parse_input_shapes(input_shape), signer=signer, name=name, timeout=timeout)
    # a Ctrl-C once the result is written (manifest and all) undoes nothing: it stops what is left, exit 0
    with interrupts_after_result_stop() as after_result:
        with progress_bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), as_json=as_json) as bar:
            task = bar.add_task("compiling", total=plan_steps(req))
            note(model=str(model), out=str(out_dir), made=not out_dir.exists())  # for the edgekit process, should this worker crash

            def step(msg: str, total: int) -> None:
                note(step=msg)
                bar.update(task, advance=1, description=msg, total=total)

            manifest = compile_model(req, progress=step)
        target = out_dir / manifest.model["name"]
        warnings = unserved_profiles(manifest)
        left = ["manifest.json on stdout (--json)" if as_json else "the result table (manifest.json holds its figures)",
                *(["the warning that a profile got no variant"] if warnings else [])]
        try:
            after_result()
            with interrupts_held() if as_json else nullcontext():  # a Ctrl-C during it comes once it is all out
                _print_result(manifest, target, as_json, signer)
                left.pop(0)
            for line in warnings:  # stderr, as every warning: --json's stdout stays the manifest alone
                sys.stderr.write(f"edgekit: warning: {printable(line)}\n")
        except StoppedAfterResult:
            if left:  # else everything was done when it came
                sys.stderr.write(f"edgekit: interrupted once the result was written: {printable(str(target))} is "
                                 f"complete (manifest.json and its variants); skipped {' and '.join(left)}\n")
        failed = [a.id for a in manifest.artifacts if a.status == "failed"]
        if failed:
            sys.stderr.write(f"edgekit: error: {len(failed)} variant(s) failed: {', '.join(failed)} "
                             "(reasons in the table and the manifest; the built ones were written)\n")
            raise typer.Exit(3)


def _print_result(manifest: Any, target: Path, as_json: bool, signer: Any) -> None:
    """Print a compile's result written in ``target``: its manifest.json as written (``--json``: signed when it was),
    or the variant table, the lines under it and where it was written. Returns nothing."""
    if as_json:
        write_whole((target / "manifest.json").read_text())
        return
    table, notes = _compile_report(manifest)
    print_whole(table)
    for line in notes:
        out.print(line, highlight=False)
    out.print(f"wrote {safe(str(target))}/manifest.json" + (f", signed by key {signer.key_id}" if signer else ""),
              soft_wrap=True)


@app.command("sign")
def sign_cmd(
    artifacts: Annotated[Path, typer.Argument(help="A compiled model's folder (with manifest.json).")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key in PEM (e.g. a fleet's keys/operator.key).")],
    as_json: JsonOpt = False,
) -> None:
    """Sign a compiled model's manifest.json, replacing any signature.

    A fleet whose artifact_keys list this key's public half deploys and rolls out only manifests it
    signed, unchanged since.
    """
    from device_agents.identity import Signer, encode_key
    from edge_kit.manifest import sign_manifest

    signer = Signer.load(key)
    manifest = sign_manifest(artifacts, signer)
    result = {"manifest": str(Path(artifacts) / "manifest.json"), "key_id": signer.key_id,
              "public_key": encode_key(signer.public), "artifacts": len(manifest.artifacts)}
    if as_json:
        emit_json(result)
    else:
        out.print(f"signed {result['manifest']} with key {signer.key_id}; trust it in a fleet file with\n"
                  f"artifact_keys: [{result['public_key']}]", highlight=False)


@app.command("example")
def example_cmd(
    name: Annotated[str, typer.Argument(help="digits (trained CNN, real accuracy), mobilenet (random weights, "
                                             "size/speed only) or mobilenetv2 (residual, trained on upsampled digits).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the model and .npz files.")] = Path("examples"),
    as_json: JsonOpt = False,
) -> None:
    """Write a bundled example model and its data files (no download needed)."""
    from edge_kit.examples import make_example

    with spinner(f"building example '{name}'", as_json):
        files = make_example(name, out_dir)
    if as_json:
        emit_json(files.record())
        return
    record = files.record()
    methods = record.pop("methods")
    for key, value in record.items():
        out.print(f"{key:>20}: {value}" + (f" ({methods[key]})" if key in methods else ""), highlight=False)


@profiles_app.command("list")
def profiles_list(as_json: JsonOpt = False) -> None:
    """List the bundled device profiles."""
    from edge_kit.profiles import bundled_profiles, load_profile

    profiles = [load_profile(n) for n in bundled_profiles()]
    if as_json:
        emit_json([p.as_dict() for p in profiles])
        return
    t = Table("name", "accelerator", "delegate", "variants", "description")
    for p in profiles:
        t.add_row(p.name, p.hardware.accelerator, p.runtime.delegate, ", ".join(p.variants), p.description)
    out.print(t)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="A bundled profile's name (`edgekit profiles list`) or a "
                                                             "path to a profile YAML file.")],
                  as_json: JsonOpt = False) -> None:
    """Show one profile (bundled name or YAML path)."""
    from edge_kit.profiles import load_profile

    p = load_profile(name)
    if as_json:
        emit_json(p.as_dict())
    else:
        out.print_json(data=p.as_dict())


@profiles_app.command("check")
def profiles_check(files: Annotated[list[Path], typer.Argument(help="Profile YAML files.")], as_json: JsonOpt = False) -> None:
    """Validate profile files; exits non-zero at the first invalid one."""
    from edge_kit.profiles import load_profile

    names = [load_profile(f).name for f in files]
    if as_json:
        emit_json({"valid": [str(f) for f in files], "names": names})
    else:
        out.print(f"{len(files)} profile(s) valid: {', '.join(names)}")
