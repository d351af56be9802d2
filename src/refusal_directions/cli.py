"""The ``refusal-directions`` command line.

Every option of ``run`` and the stage subcommands is generated from ``RunConfig`` (config.py),
so flags, TOML keys and the typed configuration never drift apart. The stages print nothing:
this module prints what they return (``stage_printer``: run folder, extraction and selection
tables, report paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import ConfigError, RunConfig, build_config, field_types

if TYPE_CHECKING:
    from rich.console import Console

    from .pipeline import Extraction, Reproduction, Run
    from .selection import MethodSelection

log = logging.getLogger("refusal_directions")

STAGE_COMMANDS = {
    "run": "Run every stage: extract -> select -> infer -> evaluate -> report (reusing valid artifacts).",
    "extract": "Cache activations and fit every method's directions (stage 1).",
    "select": "Score, filter and rank candidate components on validation prompts (stage 2).",
    "sweep": "Dose-response of every method on the selection proxies, no generation (after select; also `run --sweep`).",
    "optimize": "Pareto search (multi-objective TPE, proxies) of every method's per-layer removal kernel (after select; also `run --optimize`).",
    "geometry": "Where each planned intervention moves the validation activations relative to the clean harmful and harmless clusters (after select; part of run).",
    "infer": "Generate completions under every intervention (stage 3).",
    "evaluate": "Judge completions and measure loss and benchmarks under every intervention (stage 4).",
}


# ---------------------------------------------------------------------- options from RunConfig
def _value_parser(tp: Callable[[str], Any], optional: bool, choices: tuple | None) -> Callable[[str], Any]:
    """Parse one flag value as ``tp``; 'none' is None for Optional fields; check ``choices``."""

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        value = tp(text)
        if choices and value not in choices:
            allowed = ", ".join(map(str, choices)) + (", none" if optional else "")
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {allowed})")
        return value

    parse.__name__ = getattr(tp, "__name__", "value")  # argparse names it in "invalid int value" errors
    return parse


class _ListOrNone(argparse.Action):
    """A ``nargs="+"`` list option whose single value 'none' (already parsed to None) means None."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        if any(v is None for v in values):
            if len(values) > 1:
                raise argparse.ArgumentError(self, "'none' stands alone (it unsets the list)")
            values = None
        setattr(namespace, self.dest, values)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``RunConfig`` field. A flag not given leaves no attribute (``argparse.SUPPRESS``),
    so only given flags override the TOML file and presets, and ``none`` can set an Optional field to None."""
    types_ = field_types()
    group = parser.add_argument_group("run configuration (also settable in a TOML file with --config)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        tp, optional = types_[f.name]
        choices = f.metadata.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata['help']} (default: {default}{'; none unsets it' if optional else ''})"
        common: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            if optional:
                raise TypeError(f"RunConfig.{f.name}: an Optional bool has no flag form; make it a plain bool.")
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            group.add_argument(flag, nargs="+", type=_value_parser(item, optional, None), metavar=item.__name__.upper(),
                               action=_ListOrNone if optional else "store", **common)
        else:
            metavar = "{" + ",".join(map(str, [*choices, *(["none"] if optional else [])])) + "}" if choices else tp.__name__.upper()
            group.add_argument(flag, type=_value_parser(tp, optional, choices), metavar=metavar, **common)
    group.add_argument("--config", type=Path, default=None, help="TOML file whose keys mirror these flags (flags override it).")
    group.add_argument("--run-dir", type=Path, default=None, help="Use this run folder instead of <output-dir>/<alias>/<key>.")


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """The run configuration from parsed arguments: every flag given (including ``none``) overrides."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return build_config(overrides, args.config)


# ---------------------------------------------------------------------- commands
def cmd_stage(args: argparse.Namespace) -> None:
    from rich.console import Console

    from . import pipeline

    config, note = config_from_args(args)
    if note:
        log.warning(note)
    pipeline.run_command(args.command, config, run_dir=args.run_dir, on_event=stage_printer(Console(stderr=True)))


# ---------------------------------------------------------------------- what the stages return, printed
def stage_printer(console: Console) -> Callable[[str, Run, Any], None]:
    """A ``pipeline.run_command`` event listener printing the run folder, the extraction and
    selection summaries and the report's paths on ``console`` (a rich Console)."""

    def on_event(step: str, run: Run, result: Any) -> None:
        if step == "open":
            console.print(f"[bold]Run folder:[/bold] {run.dir}")
        elif step == "extract":
            print_extraction_summary(result, console)
        elif step == "select":
            print_selection_summary(run, result, console)
        elif step == "sweep":
            for method, records in result.items():
                console.print(f"[bold]Sweep[/bold] {method}: {len(records)} configurations ({run.path('sweep', method + '.json')})")
        elif step == "optimize":
            print_search_summary(result, console)
        elif step == "geometry":
            print_geometry_summary(result, console)
        elif step == "report":
            html, md = result
            console.print(f"[bold green]Report:[/bold green] {html}\n[bold]Summary:[/bold] {md}")

    return on_event


def print_extraction_summary(extraction: Extraction, console: Console) -> None:
    """Each method's best-separating component (``Extraction.separation``) as a table."""
    from rich.table import Table

    table = Table("method", "best-separating position", "layer", "separation", "INLP k there", title="Extraction")
    for r in extraction.separation:
        table.add_row(r["method"], str(r["position"]), str(r["layer"]), r["score"], str(r.get("inlp_k", "-")))
    console.print(table)


def print_selection_summary(run: Run, selections: dict[str, MethodSelection], console: Console) -> None:
    """Each method's best component, its scores, skipped components and layers per scope as a
    table; any selection fallback warning above it."""
    from rich.table import Table

    from .report import compress_layers
    from .scopes import Scope
    from .selection import pool_size

    scopes = [Scope.parse(text) for text in run.config.scope_list]
    pool = pool_size(selections)
    table = Table("method", "position", "layer", "bypass", "steering", "KL", "skipped",
                  *(f"layers @{s.label}" for s in scopes), title=f"Selection (hook points: {run.config.selection_hook_points})")
    for method, sel in selections.items():
        b = sel.best
        table.add_row(method, str(b.position), str(b.layer), f"{b.bypass:.3f}", f"{b.steering:.3f}", f"{b.kl:.4f}",
                      str(len(sel.skipped)),
                      *(compress_layers(s.layers(sel.ranked, pool, run.adapter.n_layers)) for s in scopes))
        if sel.fallback_warning:
            console.print(f"[yellow]{sel.fallback_warning}[/yellow]")
    console.print(table)


def print_search_summary(documents: dict[str, dict], console: Console) -> None:
    """Each method's Pareto front (KL, refusal proxy, layers) as a table."""
    from rich.table import Table

    table = Table("method", "trials", "front point", "KL", "refusal proxy", "layers", title="Pareto search (proxies)")
    for method, doc in documents.items():
        by_index = {r["index"]: r for r in doc["trials"]}
        for index in doc["front"]:
            r = by_index[index]
            layers = f"{r['layers'][0]}..{r['layers'][-1]}" if r["layers"] else "-"
            table.add_row(method, str(len(doc["trials"])), str(index), f"{r['kl']:.4f}", f"{r['refusal']:.3f}", layers)
    console.print(table)


def print_geometry_summary(result: dict, console: Console) -> None:
    """Per intervention and layer: where the harmful validation activations land (``intervention_geometry``)."""
    from rich.table import Table

    table = Table(title="Intervention geometry (harmful validation prompts)")
    for column in ("intervention", "layer", "t (0 harmful, 1 harmless)", "probe: harmless", "lands"):
        table.add_column(column)
    for entry in result.get("interventions") or []:
        for layer, cell in entry["layers"].items():
            h = cell["harmful"]
            table.add_row(entry["name"], layer, f"{h['axis_position']:.2f}", f"{h['fraction_called_harmless']:.2f}", h["verdict"])
    console.print(table)


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    for run_dir in args.run_dirs:
        html, md = write_report(Path(run_dir))
        print(f"Report: {html}\nSummary: {md}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .report import compare_runs

    out = compare_runs([Path(d) for d in args.run_dirs], Path(args.out))
    print(f"Comparison: {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from . import pipeline

    config, note = config_from_args(args)
    options = pipeline.ExportOptions(lora=args.lora, lora_dtype=args.lora_dtype, base_model=args.base_model,
                                     push_to=args.push_to_hub, private=not args.public)
    out = pipeline.export_model(config, args.method, Path(args.out), run_dir=args.run_dir, options=options)
    print(f"Exported to {out}" + (f" and uploaded to {args.push_to_hub}" if args.push_to_hub else ""))


def cmd_evaluate_model(args: argparse.Namespace) -> None:
    from rich.console import Console

    from . import pipeline

    config, note = config_from_args(args)
    if note:
        log.warning(note)
    pipeline.evaluate_model_command(config, run_dir=args.run_dir, on_event=stage_printer(Console(stderr=True)))


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Rerun a run folder and list the differences; the exit status says whether there were any."""
    from . import pipeline

    result = pipeline.reproduce_run(Path(args.run_dir), out=args.out, data_dir=args.data_dir)
    print(reproduction_text(result))
    return result.exit_code


def reproduction_text(result: Reproduction) -> str:
    """What ``reproduce`` prints: warnings, then every difference or that the artifacts are identical."""
    from .pipeline.diff import compared_artifacts

    lines = [f"Reproduced {result.original} into {result.rerun}."]
    lines += [f"WARNING: {w}" for w in result.warnings]
    if result.identical:
        lines.append(f"Identical: all {len(compared_artifacts(result.original))} artifacts are bit-identical.")
    else:
        lines.append(f"DIFFERENT: {len(result.differences)} differences (artifact [key]: what differs):")
        lines += [f"  {d}" for d in result.differences]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from .models import load_model

    adapter = load_model(args.spec, device=args.device, chat_template=args.chat_template)
    info = adapter.describe()
    table = Table(title=f"{args.spec}", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    Console().print(table)
    if args.try_prompt:
        from .generation import generate

        reply = generate(adapter, [args.try_prompt], max_new_tokens=48, batch_size=1)[0]
        Console().print(f"[bold]Prompt:[/bold] {args.try_prompt}\n[bold]Reply:[/bold] {reply}")


def cmd_datasets(args: argparse.Namespace) -> None:
    from .data import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for spec in REGISTRY.values():
        print(f"{spec.name:<{width}}  {spec.description}\n{'':<{width}}  mirror: {spec.local or '-'}   source: {spec.hub}")


def _add_evaluate_model_and_reproduce(sub: argparse._SubParsersAction) -> None:
    """The evaluate-model and reproduce commands (a model as it is; a rerun compared exactly)."""
    text = ("Generate and evaluate a model as it is (abliterated by another tool, or an `export` folder) with the "
            "same judges, metrics and paired tests as a run: against --base when given (rows 'baseline' = the base, "
            "'model' = the evaluated model; both must share architecture, tokenizer and chat template), else its own "
            "numbers only. No directions are extracted or selected.")
    p = sub.add_parser("evaluate-model", help="Evaluate a model as it is (--model M [--base B]): infer, evaluate, report.",
                       description=text)
    add_config_options(p)
    p.set_defaults(func=cmd_evaluate_model)

    text = ("Rerun a run folder from its reproduce.json (every setting, versions, data hashes) into a fresh folder and "
            "compare the artifacts exactly: directions, selection, completions, metrics. Exit status 0 when identical, "
            "3 when anything differs (each difference is listed); warns when versions, data or the model differ from the record.")
    p = sub.add_parser("reproduce", help="Rerun a run folder and compare its artifacts (exit 3 if they differ).", description=text)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None, help="Fresh folder for the rerun (default: RUN_DIR-reproduce).")
    p.add_argument("--data-dir", default=None, help="Where the dataset mirror is now, if it moved (default: as recorded).")
    p.set_defaults(func=cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refusal-directions",
        description="Find, remove and steer refusal directions: diff-in-means, INLP and LEACE side by side.",
    )
    parser.add_argument("--debug", dest="global_debug", action="store_true", help="Full tracebacks and debug logs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_options(p)
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("report", help="Write the HTML and Markdown report of run folders.", description="Write the HTML and Markdown report of run folders.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="Put several runs (models, configs) side by side in one HTML page.",
                       description="Put several runs (models, configs) side by side in one HTML page.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="comparison.html", help="Output HTML file (default: comparison.html).")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="Export a method's all-layer removal: baked HF folder or LoRA adapter, with a model card.",
                       description="Export a method's all-layer removal as a folder that AutoModelForCausalLM loads "
                                   "(baked weights) or as a PEFT LoRA adapter (--lora), with a model card (README.md) "
                                   "written from the run: diff-in-means ablation, INLP projection, or LEACE's non-affine "
                                   "(linear) erasure; the affine LEACE eraser cannot be exported exactly. Models whose "
                                   "sublayer outputs pass through a norm before the residual (Gemma-2/3, GLM-4, OLMo-2: "
                                   "found by the write-point check) cannot be exported either.")
    p.add_argument("--method", required=True, choices=["diff_in_means", "inlp", "leace"])
    p.add_argument("--out", required=True, help="Output folder.")
    p.add_argument("--lora", action="store_true", help="Write a PEFT LoRA adapter (rank k, exact) instead of full weights.")
    p.add_argument("--lora-dtype", choices=["float32", "model"], default="float32",
                   help="dtype of the adapter's factors: float32 (default) or the model's.")
    p.add_argument("--base-model", default=None, help="Hub id of the base model for the card and the adapter (default: derived from --model).")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="Upload the folder to this Hub model repository (needs a token: `hf auth login` or HF_TOKEN).")
    p.add_argument("--public", action="store_true", help="With --push-to-hub: create the repository public (default private).")
    add_config_options(p)
    p.set_defaults(func=cmd_export)

    _add_evaluate_model_and_reproduce(sub)

    p = sub.add_parser("models", help="Inspect a model: layers, d_model, post-instruction and refusal tokens.",
                       description="Inspect a model: layers, d_model, post-instruction and refusal tokens.")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    show = msub.add_parser("show", help="Load a model and print what the adapter derives from it.")
    show.add_argument("spec", nargs="?", default="embedded", help="embedded, embedded:1.5b, a hub id, a folder or a .gguf file.")
    show.add_argument("--device", default="auto")
    show.add_argument("--chat-template", default=None, help="Jinja template file for tokenizers without one.")
    show.add_argument("--try-prompt", default=None, help="Also generate a reply to this instruction.")
    show.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", help="List the named datasets.", description="List the named datasets.")
    p.set_defaults(func=cmd_datasets)
    return parser


def _setup_logging(debug: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, rich_tracebacks=debug, markup=False)
    handler.setLevel(logging.DEBUG if debug else logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("transformers", "accelerate", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(args.global_debug or getattr(args, "debug", False))
    _setup_logging(debug)
    try:
        status = args.func(args)  # None, or the command's own exit status (reproduce: 3 when artifacts differ)
    except KeyboardInterrupt:
        print("Interrupted; finished artifacts are kept and a rerun resumes from them.", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback with --debug
        if debug:
            raise
        known = isinstance(exc, (ConfigError, ValueError, RuntimeError, FileNotFoundError, OSError))
        prefix = "error" if known else f"error ({type(exc).__name__})"
        print(f"{prefix}: {exc}" + ("" if known else "  [rerun with --debug for the traceback]"), file=sys.stderr)
        return 2 if known else 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
