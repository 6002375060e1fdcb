"""`lora-fusion`: a thin Typer CLI over the library.

Commands parse options, call `lora_fusion`, and print. Heavy imports (torch, huggingface_hub) happen inside command
bodies so that `--help` and `--version` stay fast. Every error a user can cause ends with exit code 2 and one line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from .common import fail, interrupted_note, on_interrupt, user_errors, warn

app = typer.Typer(
    name="lora-fusion",
    help="Merge LoRA adapters exactly and fast, from the Hub or disk, into PEFT adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from lora_fusion import __version__

        typer.echo(f"lora-fusion {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Merge LoRA adapters exactly and fast, from the Hub or disk, into PEFT adapters."""


SourcesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Hub ids (owner/name[@revision]) or local adapter directories/files.", show_default=False),
]


WeightNameOpt = Annotated[
    Optional[str],
    typer.Option(help="The LoRA file inside each source folder or repo, when it holds several .safetensors files."),
]
InputFormatOpt = Annotated[
    Optional[str],
    typer.Option(help="Read the sources as peft, diffusers or kohya instead of detecting it from their files."),
]


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        fail(f"--weights {text!r} is not a comma-separated list of numbers; write e.g. --weights 0.6,0.4.")
    return None


def _declared_options(skipped: frozenset[str] = frozenset()) -> list[Any]:
    """`merge`'s options generated from the declarations: the merge-wide options, then every parameter a registered
    method declares (its help once, with the methods that take it), less the `skipped` names (another command that
    reuses them: bake). Built when `merge` runs or shows its help, not for `lora-fusion --help`."""
    from lora_fusion.methods import declared_params, get_method
    from lora_fusion.methods.base import load_entry_points
    from lora_fusion.params import MERGE_OPTIONS, value_type

    load_entry_points()  # installed plugins' parameters get options too
    specs = [
        (name, str if option.type == list[float] else option.type, option.short, option.help)  # --weights 0.6,0.4
        for name, option in MERGE_OPTIONS.items() if name not in skipped
    ]
    for name, (param, takers) in declared_params().items():
        kind = value_type(get_method(takers[0]).params, name)
        specs.append((name, kind if kind in (int, float, str, bool) else str, param.short,
                      f"{param.help} Taken by: {', '.join(takers)}."))
    signature = Signature([
        Parameter(
            name, Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[kind], typer.Option(f"--{name.replace('_', '-')}", *filter(None, [short]),
                                                              help=text)],
        )
        for name, kind, short, text in specs
    ])

    def declared(**values: Any) -> None:
        """Never called: its signature is how Typer builds the options."""

    declared.__signature__ = signature  # type: ignore[attr-defined]
    holder = typer.Typer(add_completion=False)
    holder.command()(declared)
    return list(typer.main.get_command(holder).params)


class _MergeCommand(TyperCommand):
    """The `merge` command, whose declared options are added when it is used (so `lora-fusion --help` stays light);
    their values reach the command in `ctx.meta["declared"]`. A command that reuses them (bake) subclasses it with
    the merge-wide options it does not take in `skipped` ([`_declared_command`])."""

    skipped: frozenset[str] = frozenset()

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        if not hasattr(self, "_declared"):
            self._declared = _declared_options(self.skipped)
        return [*params[:-1], *self._declared, params[-1]]  # --help stays last

    def invoke(self, ctx: Any) -> Any:
        names = {param.name for param in self._declared}
        ctx.meta["declared"] = {name: ctx.params.pop(name) for name in list(ctx.params) if name in names}
        return super().invoke(ctx)


def _declared_command(skipped: frozenset[str]) -> type[_MergeCommand]:
    """A command class with `merge`'s declared options, less `skipped`."""
    return type("_DeclaredCommand", (_MergeCommand,), {"skipped": skipped})


def _declared_flags(ctx: typer.Context, param: Sequence[str]) -> dict[str, Any]:
    """The declared options given on the command line, and `--param NAME=VALUE` pairs, as recipe keys."""
    # Typer gives a repeatable option that was not used as an empty tuple: not given, like None.
    flags = {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.meta["declared"].items()
             if v is not None and v != ()}
    if "weights" in flags:
        flags["weights"] = _parse_weights(flags["weights"])
    for name, value in _parse_params(param).items():
        if name in flags:
            fail(f"--param {name}=… repeats --{name.replace('_', '-')}; give it once.")
        flags[name] = value
    return flags


def _merge_arguments(
    plan: Any, *, weights: list[Any] | None, ranks: dict[str, Any], subfolder: str | None, weight_name: str | None,
    input_format: str | None,
) -> dict[str, Any]:
    """The keywords of `lora_fusion.merge` for a validated plan (recipe keys and flags) with the `--rank-pattern`
    rules (`ranks`), but its dtype and dry run."""
    return dict(
        method=plan.method,
        weights=weights,
        include=plan.include,
        exclude=plan.exclude,
        base_model=plan.base_model,
        subfolder=subfolder,
        weight_name=weight_name,
        input_format=input_format,
        device=plan.device,
        ignore_base_model=plan.ignore_base_model,
        **(plan.params | ranks),
    )


@app.command(cls=_MergeCommand)
def merge(
    ctx: typer.Context,
    sources: SourcesArg = None,
    param: Annotated[
        Optional[list[str]],
        typer.Option(help="A method parameter as NAME=VALUE (repeatable), e.g. --param density=0.3; for methods from "
                     "plugins, whose parameters have no option of their own."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; read no tensors, write nothing.")] = False,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe; flags given here override its keys.")] = None,
    subfolder: Annotated[Optional[str], typer.Option(help="Folder inside each source repo/dir.")] = None,
    weight_name: WeightNameOpt = None,
    input_format: InputFormatOpt = None,
    module_weight: Annotated[
        Optional[list[str]],
        typer.Option(help="Per-module weights 'REGEX=w1,w2,…' (one per source) for modules the regex matches "
                     "(re.search); repeatable, the first match wins; other modules keep --weights."),
    ] = None,
    rank_pattern: Annotated[
        Optional[list[str]],
        typer.Option(help="Per-module output rank 'REGEX=R' for modules the regex matches (re.search); repeatable, "
                     "the first match wins and replaces the global rank rule there (PEFT's rank_pattern)."),
    ] = None,
    report: Annotated[
        Optional[Path], typer.Option(help="Also write the merge report (as `lora-fusion report`) to this folder.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan or result as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Merge adapters into one PEFT adapter: `lora-fusion merge A B --method svd --rank 16 --out merged/`."""
    with user_errors():
        from lora_fusion.recipe import load_recipe, validated
        from lora_fusion.hub import check_push_repo_id

        flags = _declared_flags(ctx, param or [])
        if flags.get("push_to_hub") is not None:
            check_push_repo_id(flags["push_to_hub"])
        if recipe is not None:
            base = load_recipe(recipe).model_dump(exclude_none=True)
            if sources:
                warn(f"the sources given on the command line replace the {len(base['sources'])} of {recipe}.")
            plan = validated(base | flags | ({"sources": sources} if sources else {}), origin="options")
        elif sources:
            plan = validated({"sources": sources, **flags}, origin="options")
        else:
            fail("give adapters to merge (lora-fusion merge A B --out DIR) or --recipe FILE.yaml.")
        from lora_fusion.distributed import finish

        try:
            weights = _module_weights(module_weight or [], plan.source_weights(), len(plan.entries()))
            ranks = _rank_patterns(rank_pattern or [], plan.params.get("rank"))
            _run_merge(plan, weights=weights, ranks=ranks, subfolder=subfolder, weight_name=weight_name,
                       input_format=input_format, report=report, dry_run=dry_run, as_json=as_json, quiet=quiet)
        finally:
            finish()


def _module_weights(items: Sequence[str], weights: list[Any] | None, count: int) -> list[Any] | None:
    """Each source's weight with the `--module-weight REGEX=w1,w2,…` rules in front (first match wins), the
    source's own weight (a number or a recipe's rule list) after them."""
    if not items:
        return weights
    rules: list[tuple[str, list[float]]] = []
    for item in items:
        pattern, equals, text = item.rpartition("=")
        try:
            values = [float(part) for part in text.split(",")] if equals and pattern else None
        except ValueError:
            values = None
        if not values or len(values) != count:
            fail(f"--module-weight {item!r} is not REGEX=w1,w2,… with one weight per source ({count}); write e.g. "
                 f"--module-weight 'mlp={','.join(['0.5'] * count)}'.")
        rules.append((pattern, values))
    base = weights if weights is not None else [1.0] * count
    return [_in_front([{"filter": pattern, "value": values[i]} for pattern, values in rules], own)
            for i, own in enumerate(base)]


def _rank_patterns(items: Sequence[str], rank: Any) -> dict[str, Any]:
    """`rank` with the `--rank-pattern REGEX=R` rules in front (first match wins), as a per-module rule list."""
    rules = []
    for item in items:
        pattern, equals, text = item.rpartition("=")
        if not (equals and pattern and text.strip().isdigit() and int(text) >= 1):
            fail(f"--rank-pattern {item!r} is not REGEX=R with a positive integer rank; write e.g. "
                 "--rank-pattern 'mlp=8'.")
        rules.append({"filter": pattern, "value": int(text)})
    return {"rank": _in_front(rules, rank)} if rules else {}


def _in_front(rules: list[dict[str, Any]], own: Any) -> list[dict[str, Any]]:
    """Rules that come first, then `own`: a rule list, a value for every other module, or nothing (None)."""
    if own is None:
        return rules
    return rules + (list(own) if isinstance(own, list) else [{"value": own}])


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`--param NAME=VALUE` pairs; each VALUE is read as a YAML scalar (16, 0.3, true, core), as in a recipe."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        name, equals, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not equals or not name:
            fail(f"--param {item!r} is not NAME=VALUE; write e.g. --param density=0.3.")
        if name in parsed:
            fail(f"--param {name} is given twice; give it once.")
        try:
            parsed[name] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            parsed[name] = text
    return parsed


def _run_merge(
    plan: Any, *, weights: list[Any] | None, ranks: dict[str, Any], subfolder: str | None, weight_name: str | None,
    input_format: str | None, report: Path | None, dry_run: bool, as_json: bool, quiet: bool,
) -> None:
    from lora_fusion.distributed import is_main_process
    from lora_fusion.api import merge as fuse

    if not dry_run and plan.out is None and plan.push_to_hub is None:
        fail("say where the merged adapter goes: --out DIR (and/or --push-to-hub REPO).")
    from lora_fusion.hub import check_push_allowed
    from lora_fusion.writer import check_output

    if not dry_run and plan.out:  # before any download or merge: what --overwrite may replace, sources protected
        inputs = [*(entry.source for entry in plan.entries()), *(p for p in (plan.base_model, *plan.path_params().values()) if p)]
        check_output(Path(plan.out), overwrite=bool(plan.overwrite), protected=inputs, format=plan.format)
    if not dry_run and plan.push_to_hub:
        check_push_allowed(plan.push_to_hub)
    if not dry_run and report is not None:
        from lora_fusion.report import check_report_folder

        check_report_folder(report, overwrite=bool(plan.overwrite), protected=[e.source for e in plan.entries()])
    if dry_run and plan.out and Path(plan.out).exists():
        warn(f"--out {plan.out} already exists: a real run would need --overwrite.")
    if plan.out:
        kept = "untouched" if Path(plan.out).exists() else "not created"
        on_interrupt(f"interrupted; nothing written; {plan.out} {kept}.")
    result = fuse(
        plan.entries(),
        **_merge_arguments(plan, weights=weights, ranks=ranks, subfolder=subfolder, weight_name=weight_name,
                           input_format=input_format),
        dtype=plan.dtype,
        distributed=True,
        dry_run=dry_run,
        progress=False if quiet else None,
    )
    if not is_main_process():
        return  # under accelerate launch every process holds the result; the main one writes and reports it
    if dry_run:
        typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))
        return
    written = result.save_pretrained(plan.out, overwrite=plan.overwrite, format=plan.format) if plan.out else None
    if written and plan.push_to_hub:
        on_interrupt(f"interrupted; {written} is written; the push to {plan.push_to_hub} may be incomplete: run "
                      f"`lora-fusion push {written} {plan.push_to_hub}`.")
    url = _push(result, plan, written) if plan.push_to_hub else None
    if report is not None:
        _write_report(result, plan, report, subfolder=subfolder, weight_name=weight_name, input_format=input_format)
    truncated = [s for s in result.stats.values() if s.truncated]
    summary = {
        "out": str(written) if written else None,
        "pushed": url,
        "method": result.provenance["method"],
        "modules": len(result.modules),
        "ranks": sorted({s.rank for s in result.stats.values()}),
        "min_retained_energy": min((s.retained_energy for s in truncated), default=1.0),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    where = " and ".join(x for x in (str(written) if written else "", url or "") if x)
    typer.echo(
        f"merged {summary['modules']} modules with {summary['method']} (ranks {summary['ranks']}, "
        f"min retained energy {summary['min_retained_energy']:.6f}) -> {where}"
    )


def _write_report(
    result: Any, plan: Any, folder: Path, *, subfolder: str | None, weight_name: str | None, input_format: str | None
) -> None:
    """`merge --report`: the report of the merged adapter and its sources (opened again: headers, then factors)."""
    from lora_fusion.report import build_report, write_report
    from lora_fusion.sources import load_adapter

    sources = [load_adapter(e.source, revision=e.revision, subfolder=e.subfolder or subfolder,
                            weight_name=e.weight_name or weight_name, input_format=input_format)
               for e in plan.entries()]
    written = write_report(build_report(sources, result), folder, overwrite=bool(plan.overwrite))
    typer.echo(f"report written to {written}", err=True)


def _push(result: Any, plan: Any, written: Path | None) -> str:
    """Push the merged adapter; if that fails after it was saved, say where it is and how to send it again."""
    from lora_fusion.errors import HubError

    try:
        return result.push_to_hub(plan.push_to_hub, private=plan.private, format=plan.format)
    except HubError as err:
        if written is None:
            raise
        raise HubError(
            f"{err} The merged adapter is saved in {written}; send it with `lora-fusion push {written} "
            f"{plan.push_to_hub}`."
        ) from None


@app.command()
def inspect(
    sources: Annotated[list[str], typer.Argument(help="Hub ids or local adapter directories.", show_default=False)],
    subfolder: Annotated[Optional[str], typer.Option(help="Folder inside each source.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with every module.")] = False,
    interference: Annotated[
        bool, typer.Option("--interference", help="Cosine, top-k sign conflicts and subspace overlap between them.")
    ] = False,
    density: Annotated[float, typer.Option(help="Top-k fraction for --interference sign conflicts.")] = 0.2,
    weight_name: WeightNameOpt = None,
    input_format: InputFormatOpt = None,
) -> None:
    """Describe adapters: base model, resolved commit, modules, ranks, scales, dtype and size (headers only)."""
    with user_errors():
        from lora_fusion.sources import load_adapter

        adapters = [load_adapter(s, subfolder=subfolder, weight_name=weight_name, input_format=input_format)
                    for s in sources]
        if interference:
            _print_interference(adapters, density=density, as_json=as_json)
            return
        reports = [_describe(a) for a in adapters]
        if as_json:
            typer.echo(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
            return
        for report in reports:
            typer.echo(
                f"{report['source']}: base {report['base_model']}, commit {report['commit'] or '-'}, "
                f"{len(report['modules'])} modules, ranks {report['ranks']}, scales {report['scales']}, "
                f"{report['dtype']}, {report['parameters']:,} parameters"
            )


def _print_interference(adapters: list[Any], *, density: float, as_json: bool) -> None:
    from lora_fusion.diagnostics import interference_report
    from lora_fusion.errors import InvalidParameterError

    if len(adapters) < 2:
        fail("--interference compares adapters: give at least two.")
    if not 0.0 < density <= 1.0:
        raise InvalidParameterError("density", density, expected="a fraction in (0, 1], e.g. 0.2")
    report = interference_report(adapters, density=density)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for i, name in enumerate(report["sources"]):
        typer.echo(f"[{i}] {name}")
    overall = report["overall"]
    typer.echo(f"{overall['modules']} shared modules; top-{density:g} sign conflicts {overall['sign_conflict']:.3f}")
    for pair, stats in overall["pairs"].items():
        typer.echo(f"  {pair}: cosine {stats['cosine']:+.3f}, subspace overlap {stats['subspace_overlap']:.3f}")
    if report["unmatched"]:
        typer.echo(f"{len(report['unmatched'])} modules not compared:")
        for module, reason in report["unmatched"].items():
            typer.echo(f"  {module}: {reason}")


def _describe(adapter: Any) -> dict[str, Any]:
    specs = adapter.modules.values()
    return {
        "source": adapter.source.source,
        "commit": adapter.source.commit,
        "base_model": adapter.base_model,
        "ranks": sorted({s.rank for s in specs}),
        "scales": sorted({round(s.scale, 6) for s in specs}),
        "dtype": ", ".join(sorted({str(s.dtype).removeprefix("torch.") for s in specs})),
        "parameters": sum(s.rank * (s.out_features + s.in_features) for s in specs),
        "modules": {
            s.name: {"kind": s.kind, "shape": list(s.shape), "rank": s.rank, "scale": s.scale} for s in specs
        },
    }


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A LoRA file or folder, or a Hub id (owner/name[@revision]).")],
    to: Annotated[str, typer.Option("--to", help="Output format: peft, diffusers (folders) or kohya (one file).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder, or a .safetensors file for kohya.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an --out that lora-fusion wrote.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit of a Hub source.")] = None,
    subfolder: Annotated[Optional[str], typer.Option(help="Folder inside the source repo/dir.")] = None,
    weight_name: WeightNameOpt = None,
    input_format: InputFormatOpt = None,
) -> None:
    """Rewrite a LoRA in another format, exactly (kohya/A1111, ComfyUI, Flux, LyCORIS, diffusers, PEFT)."""
    with user_errors():
        from lora_fusion.formats import format_named
        from lora_fusion.writer import check_output

        target = format_named(to)
        check_output(out, overwrite=overwrite, protected=[source], format=target)
        on_interrupt(f"interrupted; nothing written; {out} {'untouched' if out.exists() else 'not created'}.")
        from lora_fusion.api import convert as rewrite

        written = rewrite(source, to=target.name, out=out, overwrite=overwrite, revision=revision,
                          subfolder=subfolder, weight_name=weight_name, input_format=input_format)
        typer.echo(f"converted {source} -> {written} ({target.name})")


@app.command()
def push(
    directory: Annotated[Path, typer.Argument(help="A PEFT adapter directory (e.g. written by merge).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, owner/name.")],
    private: Annotated[Optional[bool], typer.Option("--private", help="Create the repo private.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created if missing).")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="Commit message.")] = None,
) -> None:
    """Upload an adapter directory to the Hub (token from HF_TOKEN or `hf auth login`)."""
    with user_errors():
        from lora_fusion.hub import check_push_repo_id, push_folder
        from lora_fusion.sources import load_adapter

        check_push_repo_id(repo_id)
        load_adapter(directory)
        on_interrupt(f"interrupted; {directory} is unchanged; the upload to {repo_id} may be incomplete: run the "
                      "same command again.")  # refuse to publish something that is not a valid adapter
        pushed = push_folder(directory, repo_id, private=private, revision=revision, commit_message=commit_message)
        typer.echo(f"pushed {directory} -> {pushed}" if pushed.changed else f"{directory}: {pushed.summary}")


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the merge methods: name, what it does, reference."""
    from lora_fusion.methods import list_methods

    rows = [
        {"name": m.name, "aliases": list(m.aliases), "summary": m.summary, "formula": m.formula,
         "reference": m.reference, "params": m.describe()}
        for m in list_methods()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        alias = f" (alias: {', '.join(row['aliases'])})" if row["aliases"] else ""
        typer.echo(f"{row['name']}{alias}\n    {row['summary']}\n    {row['formula']}\n    {row['reference']}")
        for name, param in row["params"].items():
            typer.echo(f"    --{name.replace('_', '-')} (default {param['default']}): {param['help']}")


from .bake import BAKE_SKIPPED, bake as bake_command  # noqa: E402
from .cil import cil_app  # noqa: E402
from .icm import icm_app  # noqa: E402
from .report import report as report_command  # noqa: E402
from .extract import extract as extract_command  # noqa: E402

app.add_typer(cil_app, name="cil")
app.add_typer(icm_app, name="icm")
app.command("report")(report_command)
app.command("bake", cls=_declared_command(BAKE_SKIPPED))(bake_command)
app.command("extract")(extract_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: like `app()`, but parse errors also end on one line with exit code 2."""
    on_interrupt("interrupted.")
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except (typer.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort; outside its parser it stays itself
        typer.echo(interrupted_note(), err=True)
        return 130
    except Exception as err:
        # Parser errors (unknown option, bad value, missing argument) carry exit_code 2 and format_message().
        if getattr(err, "exit_code", None) == 2 and hasattr(err, "format_message"):
            command = " ".join(sys.argv[1:2]) if argv is None else " ".join(list(argv)[:1])
            typer.echo(f"Error: {err.format_message()}. See `lora-fusion {command} --help`.".replace("..", "."), err=True)
            return 2
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
