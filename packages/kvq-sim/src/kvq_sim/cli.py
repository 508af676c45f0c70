"""The `kvq-sim` command: `plan` a deployment and `list` GPUs, models and methods (imports no torch)."""

from __future__ import annotations

import sys

import click

from .errors import SimInputError

FORMATS = ("table", "json", "csv")


def _fail(message: str) -> None:
    """One line on stderr and exit code 2: the usage-error convention of click."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _percent(ctx, param, value):
    """A click callback: None, or a finite percentage >= 0 (a NaN or negative threshold would pass or fail
    every run)."""
    import math

    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"expected a finite percentage >= 0, got {value}")
    return value


def _folder(ctx, param, value):
    """A click callback: a folder the user named must exist (the default may be absent: nothing to show)."""
    from pathlib import Path

    source = ctx.get_parameter_source(param.name)
    if source is not click.core.ParameterSource.DEFAULT and not Path(value).is_dir():
        raise click.BadParameter(f"{value} is not a folder")
    return value


def _folder_option(name: str, default: str, holds: str):
    """A report option naming a folder of `holds`; one the user names must exist (`_folder`)."""
    return click.option(
        name,
        type=click.Path(file_okay=False),
        default=default,
        show_default=True,
        callback=_folder,
        help=f"folder of {holds} (a named one must exist)",
    )


class _Group(click.Group):
    """click's group with its usage errors (a bad option value, a missing option) on one stderr line and
    exit code 2, like every other input error; click would print the usage block above them."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(2)
        except click.UsageError as e:
            see = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            _fail(" ".join(e.format_message().split()) + see)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            _fail("aborted")


@click.group(cls=_Group)
def main() -> None:
    """Memory, bandwidth and decode-latency simulator for quantized KV caches."""


@main.command()
@click.option("--model", required=True, help="model name (kvq-sim list models) or path to a config.json / YAML")
@click.option("--gpu", required=True, help="GPU or node name (kvq-sim list gpus) or path to a hardware YAML")
@click.option(
    "--bits",
    default=None,
    help="KV bits: 2, 3, 4, 8 (kivi) or 16 (fp16) alone; other widths, k<bits>v<bits> (e.g. k2v1.5) and 0 "
    "(eviction) with the --method that stores them",
)
@click.option("--method", default=None, help="KV method (kvq-sim list methods); default for a bare --bits: kivi")
@click.option("--weight-bits", type=int, default=None, help="weight bits: 16 (default), 8, 4, 2")
@click.option("--recipe", default=None, help="serving recipe: weights, activations, KV (kvq-sim list recipes)")
@click.option("--context", type=int, default=None, help="tokens per sequence (alone: max batch at this context)")
@click.option("--batch", type=int, default=None, help="sequences (alone: max context at this batch)")
@click.option("--prompt", type=int, default=None, help="workload prompt tokens (with --generate)")
@click.option("--generate", type=int, default=None, help="workload generated tokens (with --prompt)")
@click.option(
    "--gen-tokens",
    type=int,
    default=None,
    help="long generation: tokens generated per request (with --prompt); times the request",
)
@click.option(
    "--shared-prefix-tokens", type=int, default=0, help="tokens of each context shared by the batch, stored once"
)
@click.option(
    "--prefix-reads",
    type=click.Choice(["per-sequence", "shared"]),
    default="per-sequence",
    help="decode attention reads the shared prefix once per sequence (paged) or once per batch (cascade kernel)",
)
@click.option("--gpus", type=int, default=None, help="GPUs to use (default: all of the node)")
@click.option("--parallel", type=click.Choice(["tp", "cp"]), default="tp", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "--strict-context",
    is_flag=True,
    help="refuse (exit 2) a --context or --prompt + generated tokens beyond the model's max_position_embeddings; "
    "without it such a context is planned with a warning on stderr. A max context the search finds beyond "
    "max_position_embeddings is always printed, with a warning on stderr",
)
@click.option(
    "--engine",
    default=None,
    help="serving-engine preset adding its named overheads (configs/engines/engines.yaml: fused, hf-eager, nemo, "
    "trtllm, vllm); default: the fused roofline alone",
)
def plan(
    model,
    gpu,
    bits,
    method,
    weight_bits,
    recipe,
    context,
    batch,
    prompt,
    generate,
    gen_tokens,
    shared_prefix_tokens,
    prefix_reads,
    gpus,
    parallel,
    fmt,
    strict_context,
    engine,
) -> None:
    """Max context, max batch, memory breakdown and decode speed of one deployment."""
    from . import api, render

    try:
        result = api.plan(
            model,
            gpu,
            bits=bits,
            method=method,
            weight_bits=weight_bits,
            context=context,
            batch=batch,
            gpus=gpus,
            parallel=parallel,
            prompt=prompt,
            generate=generate,
            recipe=recipe,
            shared_prefix_tokens=shared_prefix_tokens,
            prefix_reads=prefix_reads,
            gen_tokens=gen_tokens,
            strict_context=strict_context,
            engine=engine,
        )
    except SimInputError as e:
        _fail(str(e))
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo({"table": render.table, "json": render.as_json, "csv": render.as_csv}[fmt](result))


@main.command()
@click.option("--model", required=True, help="model name (kvq-sim list models) or path to a config.json / YAML")
@click.option("--gpu", "gpus", multiple=True, required=True, help="GPU name or hardware YAML; repeat for several")
@click.option("--methods", default=None, help="comma list of method[:bits], e.g. kivi:2,kvquant:3 (fp16 always added)")
@_folder_option("--measurements", "reports/measurements", "measurement CSVs")
@_folder_option("--quality", "reports/quality", "quality CSVs")
@click.option(
    "-o",
    "--output",
    required=True,
    help="PDF to write; checked before rendering. An existing PDF is replaced (its previous bytes kept in "
    "<output>.bak, or <output>.<n>.bak when that name is taken); any other existing file is refused",
)
def report(model, gpus, methods, measurements, quality, output) -> None:
    """A multi-page PDF: memory, max context and batch, decode speed, roofline, validation, quality."""
    from pathlib import Path

    from . import report as rep

    try:
        rep.check_output(Path(output))
        methods = methods or rep.DEFAULT_METHODS
        inp = rep.resolve_inputs(
            model, list(gpus), methods, measurements_dir=Path(measurements), quality_dir=Path(quality)
        )
        pages = rep.write_report(inp, Path(output))
    except SimInputError as e:
        _fail(str(e))
    click.echo(f"wrote {output} ({pages} pages)")


@main.command()
@click.option(
    "--gpu",
    required=True,
    help="GPU name (kvq-sim list gpus) or hardware YAML path whose calibration fit file is written",
)
@click.option(
    "--measurements",
    multiple=True,
    help="kernel decode CSV (reports/measurements/kernel_decode_*.csv); repeat it for sweeps of other head layouts",
)
@click.option("--e2e", default=None, help="end-to-end decode-step CSV (reports/measurements/e2e_decode_*.csv)")
@click.option("--transfer-from", default=None, help="instead of measurements: carry another, measured GPU's fit over")
@click.option(
    "--overwrite-measured",
    is_flag=True,
    help="with --transfer-from: replace a calibration that was measured on --gpu itself (refused without it)",
)
@click.option(
    "--accept-worse-fit",
    is_flag=True,
    help="write a fit with a family's training MAPE above 20%, or more than 1 point above the file's measured "
    "fit, or missing a family the file has (refused without it)",
)
@click.option(
    "--multigpu",
    default=None,
    help="instead: multi-GPU decode-step CSV (benchmarks/multigpu_decode.py) whose training half fits the node's "
    "collective costs per layout, written to the file its YAML names in collectives_fit",
)
@click.option("--dry-run", is_flag=True, help="print the fit and the fit file's text; write nothing")
def calibrate(gpu, measurements, e2e, transfer_from, overwrite_measured, accept_worse_fit, multigpu, dry_run) -> None:
    """Fit kernel-family and e2e efficiencies on the training split; write them to the GPU's fit file.

    The fit goes to the file the GPU's YAML names in calibration_fit (configs/hardware/fits/<gpu>-calibration.yaml),
    never into the hand-written GPU YAML. The fit file is checked writable before any fitting, written atomically
    (temporary file, then rename) and only when its text changes; its previous text is kept beside it in <file>.bak
    (<file>.<n>.bak when that name is taken: no existing file is overwritten).
    """
    from . import calibrate as cal
    from .configs import resolve
    from .hardware import load_hardware
    from .measurements import read_e2e_csv, read_kernel_csvs

    if multigpu:
        _calibrate_multigpu(gpu, multigpu, measurements or e2e or transfer_from, dry_run)
        return
    try:
        if transfer_from and (measurements or e2e):
            raise SimInputError("give --measurements (and --e2e) or --transfer-from, not both")
        if not transfer_from and not measurements:
            raise SimInputError("give --measurements (a kernel decode CSV) or --transfer-from (a calibrated GPU)")
        path = resolve("hardware", gpu) if dry_run else cal.calibration_path(gpu)
        hw = load_hardware(gpu)
        if transfer_from:
            cal.check_transfer(transfer_from, path, overwrite_measured)
            section = cal.transferred_yaml(load_hardware(transfer_from), hw)
            if dry_run:
                click.echo(section)
                return
            changed = cal.write_calibration(path, section)
            click.echo(cal.written(path, changed, f"calibration transferred from {transfer_from}"))
            return
        device = cal.check_device(hw)
        kpts, kprov = read_kernel_csvs(measurements, device)
        epts, eprov = read_e2e_csv(e2e, device) if e2e else (None, None)
        result = cal.calibrate(hw, kpts, epts, source=kprov.path)
        worse = cal.fit_regressions(path, result)
        if worse and not accept_worse_fit and not dry_run:
            raise SimInputError(
                f"{cal.display_path(path)} not written: the new fit is worse ({'; '.join(worse)}); "
                "pass --accept-worse-fit to write it"
            )
        section = cal.calibration_yaml(hw, result, kprov, eprov)
        changed = None if dry_run else cal.write_calibration(path, section)
    except SimInputError as e:
        _fail(str(e))
    click.echo(cal.summary(hw, result))
    if dry_run:
        for w in worse:
            click.echo(f"warning: without --accept-worse-fit this fit would not be written: {w}", err=True)
        click.echo(section)
    else:
        click.echo(cal.written(path, changed))


def _calibrate_multigpu(gpu: str, csv_path: str, other, dry_run: bool) -> None:
    from . import multigpu as mg
    from .configs import display_path, resolve
    from .hardware import load_hardware

    try:
        if other:
            raise SimInputError("--multigpu fits collectives alone: drop --measurements, --e2e and --transfer-from")
        hw = load_hardware(gpu)
        if hw.gpus < 2:
            raise SimInputError(f"{gpu} is a single GPU: --multigpu fits a node of several (e.g. 8x-h100)")
        path, named = mg.fit_file_path(resolve("hardware", gpu))
        points, prov = mg.read_steps(csv_path)
        if prov["device"] != (hw.torch_device_name or prov["device"]):
            raise SimInputError(f"{csv_path}: measured on {prov['device']}, but {gpu} describes {hw.torch_device_name}")
        fits = mg.fit(hw, points)
        doc = mg.fit_document(fits, prov)
        changed = None if dry_run else mg.write_fit(path, doc)
    except SimInputError as e:
        _fail(str(e))
    click.echo(mg.render_fits(fits))
    if dry_run:
        return
    click.echo(f"{'wrote' if changed else 'unchanged:'} {display_path(path)}")
    if not named:
        click.echo(
            f"note: add 'collectives_fit: {path.relative_to(resolve('hardware', gpu).parent)}' to "
            f"{display_path(resolve('hardware', gpu))} so plans use it",
            err=True,
        )


@main.command()
@click.option("--gpu", default=None, help="calibrated GPU name (kvq-sim list gpus); not with --published")
@click.option(
    "--measurements", multiple=True, help="kernel decode CSV the GPU was calibrated from (repeat it for several)"
)
@click.option("--e2e", default=None, help="end-to-end decode-step CSV (without it e2e and memory are not checked)")
@click.option("--multigpu", default=None, help="multi-GPU decode-step CSV: check the node's collective fits")
@click.option(
    "--published",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[CSV]",
    help="instead: predict published measurements of other systems (default: reports/published/points.csv) and "
    "print errors per source and GPU/parallelism class, held-out and calibration apart",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", help="with --published")
@click.option(
    "--max-mape",
    type=float,
    default=None,
    callback=_percent,
    help="with --published: exit 1 above this held-out MAPE (%)",
)
@click.option(
    "--max-class-bias",
    type=float,
    default=None,
    callback=_percent,
    help="with --published: exit 1 when a held-out GPU/parallelism class's signed mean error is beyond +-this (%)",
)
def validate(gpu, measurements, e2e, multigpu, published, fmt, max_mape, max_class_bias) -> None:
    """Predict every held-out measured point; exit 1 when a threshold of kvq_sim.validate is exceeded.

    With --published: predict published measurements of other serving systems (kvq_sim.published); exit 1
    only when --max-mape or --max-class-bias is given and exceeded.
    """
    from . import validate as val
    from .calibrate import check_device
    from .hardware import load_hardware
    from .measurements import read_e2e_csv, read_kernel_csvs

    if published is not None:
        if gpu or measurements or e2e or multigpu:
            _fail("--published checks its own file: drop --gpu, --measurements, --e2e and --multigpu")
        _validate_published(published, fmt, max_mape, max_class_bias)
        return
    if fmt != "table" or max_mape is not None or max_class_bias is not None:
        _fail("--format, --max-mape and --max-class-bias go with --published")
    if gpu is None:
        _fail("give --gpu (a calibrated GPU) with --measurements and/or --multigpu, or --published")
    if not measurements and multigpu is None:
        _fail("give --measurements (a kernel decode CSV) and/or --multigpu (a multi-GPU decode-step CSV)")
    if not measurements:
        from . import multigpu as mg

        try:
            text, ok = mg.validate_steps(load_hardware(gpu), mg.read_steps(multigpu)[0])
        except SimInputError as e:
            _fail(str(e))
        click.echo(text)
        sys.exit(0 if ok else 1)
    try:
        hw = load_hardware(gpu)
        device = check_device(hw)
        kpts, _ = read_kernel_csvs(measurements, device)
        epts = read_e2e_csv(e2e, device)[0] if e2e else None
        rep = val.validate(hw, kpts, epts)
    except SimInputError as e:
        _fail(str(e))
    click.echo(val.render(rep))
    ok = rep.passed
    if multigpu:
        from . import multigpu as mg

        try:
            text, mg_ok = mg.validate_steps(hw, mg.read_steps(multigpu)[0])
        except SimInputError as e:
            _fail(str(e))
        click.echo(text)
        ok = ok and mg_ok
    sys.exit(0 if ok else 1)


def _validate_published(csv_path: str, fmt: str, max_mape, max_class_bias) -> None:
    import json

    from . import published as pub

    try:
        rep = pub.validate(csv_path or pub.DEFAULT_CSV)
    except SimInputError as e:
        _fail(str(e))
    click.echo(json.dumps(rep.to_dict(), indent=1) if fmt == "json" else pub.render(rep))
    bad = pub.over_thresholds(rep, max_mape, max_class_bias)
    for line in bad:
        click.echo(f"FAIL {line}", err=True)
    sys.exit(1 if bad else 0)


@main.command("list")
@click.argument("what", type=click.Choice(["gpus", "models", "methods", "recipes", "engines"]))
def list_(what: str) -> None:
    """List the GPUs, models, KV methods, serving recipes or engine presets kvq-sim knows."""
    try:
        click.echo(_listing(what))
    except SimInputError as e:
        _fail(str(e))


def _listing(what: str) -> str:
    from .api import LIST_CONTEXT
    from .hardware import GIB, hardware_names, load_hardware
    from .models import load_model, model_names

    if what == "gpus":
        rows = ["name          gpus  usable/GPU   bandwidth   fp16 dense  interconnect"]
        for n in hardware_names():
            h = load_hardware(n)
            rows.append(
                f"{n:<13}{h.gpus:>5} {h.usable_memory_bytes / GIB:>7.2f} GiB {h.hbm_bandwidth_gb_s:>6,.0f} GB/s "
                f"{h.fp16_dense_tflops:>6,.0f} TF/s  {h.interconnect} {h.interconnect_bandwidth_gb_s:,.0f} GB/s"
            )
        return "\n".join(rows)
    if what == "models":
        rows = ["name           layers  hidden  heads/kv  params     fp16 KV/token  window"]
        for n in model_names():
            m = load_model(n)
            kv_kib = m.num_hidden_layers * 2 * m.kv_size * 2 / 1024
            window = m.sliding_window or "-"
            rows.append(
                f"{n:<15}{m.num_hidden_layers:>6}{m.hidden_size:>8}  {m.num_attention_heads:>3}/{m.num_key_value_heads:<4}"
                f"{m.params / 1e9:>6.2f} B  {kv_kib:>9.1f} KiB  {window}"
            )
        return "\n".join(rows)
    if what == "engines":
        from .engines import engine_names, get_engine
        from .provenance import engine_note

        return "\n".join(
            f"{n:<10}{get_engine(n).description}\n{'':<10}{engine_note(get_engine(n))}" for n in engine_names()
        )
    if what == "recipes":
        from .recipes import RECIPES, TRAINING_NOTE

        ref = load_model("llama-7b")
        rows = ["recipe           W/A/KV       weight bits   KV method   note"]
        for r in RECIPES.values():
            wavg = r.weights.avg_bits(ref.q_size, ref.hidden_size)
            note = TRAINING_NOTE if r.needs_training else r.note
            rows.append(f"{r.name:<17}{r.label:<13}{wavg:>8.3f}      {r.kv_method} {r.kv_bits:<7} {note}")
            rows.append(f"{'':<17}{r.citation}")
        return "\n".join(rows)
    from kvq_core.formats import METHODS, bits_label, get_format

    ref = load_model("llama-7b")
    rows = [f"method         bits    avg bits at {LIST_CONTEXT // 1024}K tokens (llama-7b layer: 32 KV heads x 128)"]
    for name, spec in METHODS.items():
        for kv in spec.bits:
            f = get_format(name, kv)
            avg = f.avg_bits(LIST_CONTEXT, ref.num_key_value_heads, ref.head_dim)
            rows.append(f"{name:<15}{bits_label(kv):<8}{avg:>7.3f}   {spec.summary}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
