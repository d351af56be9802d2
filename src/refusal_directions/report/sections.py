"""The report's content: each section of a run's report, built once as page-model blocks.

Owns ``build_report`` and ``SECTIONS``, the ordered list of section builders. A builder is a function
``(page, art) -> None`` that appends blocks (headings, paragraphs, ``Table``s of ``Cell``s, images) to
the ``Page``; the HTML and the Markdown page both render what it appended. A builder that raises
costs only its own section (the blocks it appended so far stay, and the Notes say what failed).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from .. import __version__
from ..artifacts import read_jsonl
from ..search import matched_damage
from ..selection import MethodSelection
from .figures import (GEOMETRY_PLOTS, SELECTION_METRICS, figure_png, fronts_figure, heatmap_figure, inlp_accuracy_figure,
                      intervention_geometry_figure, pareto_figure, selection_figure, sweep_figure)
from .format import (compress_layers, describe_intervention, evaluate_model_title, fmt_num, format_interval, is_number,
                     model_text, statistics_legend, visible_text)
from .load import (METHOD_LABELS, STAGES, RunArtifacts, better_arrow, harmful_datasets, intervention_names, metric_label,
                   ordered_metrics, summary_cell)
from .model import (Cell, Example, ExampleGroup, Heading, Page, Quote, ReadFirst, Row, Table, image, metric_cell,
                    not_run_notes)
from .read_first import read_first_warnings

log = logging.getLogger(__name__)

CE_METRICS = ("ce/general", "ce/alpaca", "ce/on_distribution")

Section = Callable[[Page, RunArtifacts], None]


# ====================================================================== header
def header(page: Page, art: RunArtifacts) -> None:
    """The title, the run's metadata table and which stages exist (an evaluate-model run has no
    extract or select stage: it names both models instead)."""
    evaluated = art.evaluate_model
    title = evaluate_model_title(evaluated) if evaluated else f"Refusal directions: {art.model.get('name') or 'unknown model'}"
    page.add(Heading(1, title))
    page.add(Table(None, [Row((Cell(k), Cell(v))) for k, v in _meta_rows(art)], css="meta"))
    stages = [s for s in STAGES if not (evaluated and s in ("extract", "select"))]  # evaluate-model runs have no directions
    stage_text = ", ".join(f"{s}: {'done' if art.stages.get(s) else 'missing'}" for s in stages)
    missing = [s for s in art.missing_stages if s in stages]
    if missing:
        page.add(Quote(f"Stages missing: {', '.join(missing)}. This report shows what exists ({stage_text}); "
                       "run the missing stages (e.g. `refusal-directions run` with the same settings) to complete it.",
                       "missing", strong=True))
    else:
        page.para(f"Stages: {stage_text}.", "small")


def _meta_rows(art: RunArtifacts) -> list[tuple[str, str]]:
    """(label, text) of the header table: (for an evaluate-model run, the run kind, both models and what
    the rows are), model, architecture, run, settings, versions, timings."""
    model, config, manifest, evaluated = art.model, art.config, art.manifest or {}, art.evaluate_model
    rows = [
        *(_evaluate_model_rows(evaluated) if evaluated else []),
        ("model", model_text(model) + (" (the model whose modules ran)" if evaluated else "")),
        ("architecture", f"{model.get('n_layers', 'n/a')} layers, d_model {model.get('d_model', 'n/a')}, "
                         f"dtype {model.get('dtype', 'n/a')}, device {model.get('device', 'n/a')}"),
        ("run", f"key {manifest.get('key', 'n/a')}, folder {art.dir}"),
        ("preset", str(config.get("preset", "n/a"))),
        ("sizes", f"n_train {config.get('n_train', 'n/a')}, n_val {config.get('n_val', 'n/a')}, "
                  f"n_test {config.get('n_test', 'n/a')}, max_new_tokens {config.get('max_new_tokens', 'n/a')}"),
        ("positions", str(config.get("positions") if config.get("positions") is not None else "all post-instruction")),
        ("methods", ", ".join(config.get("methods") or []) or "n/a"),
        ("scoring / scope", f"{config.get('scoring', 'n/a')} scoring; {_scope_text(config)}"),
        ("evaluation sets", ", ".join(config.get("eval_datasets") or []) or "n/a"),
        ("seed", str(config.get("seed", manifest.get("seed", "n/a")))),
        ("package version", f"{manifest.get('package_version', 'n/a')} (report written by {__version__})"),
        ("stage timings", _timings_text(manifest.get("timings") or {})),
    ]
    if evaluated:  # no directions: the extraction and selection settings did not apply
        rows = [r for r in rows if r[0] not in ("positions", "methods", "scoring / scope")]
        rows = [("sizes", f"n_test {config.get('n_test', 'n/a')}, max_new_tokens {config.get('max_new_tokens', 'n/a')}")
                if k == "sizes" else (k, v) for k, v in rows]
    versions = manifest.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows


def _evaluate_model_rows(evaluated: dict) -> list[tuple[str, str]]:
    """The header rows naming an evaluate-model run's models and what its rows are."""
    model, base = evaluated.get("model") or {}, evaluated.get("base")
    if base:
        meaning = ("row baseline: the base model as it is (the baseline of every paired test); row model: the "
                   "evaluated model; no directions were extracted or selected")
        return [("run kind", "evaluate-model"), ("evaluated model", model_text(model)), ("base model", model_text(base)),
                ("rows", meaning)]
    return [("run kind", "evaluate-model"), ("evaluated model", model_text(model)), ("base model", "none given"),
            ("rows", "row baseline: the evaluated model itself (its own numbers, no paired tests)")]


def _scope_text(config: dict) -> str:
    """The scopes, their directions, the selection hook points and the protocol of a configuration."""
    if not config:
        return "n/a"
    if config.get("just_one"):
        scopes = ["one"]
    elif config.get("top_fraction") is not None:
        scopes = [f"top:{config['top_fraction']:g}"]
    else:
        scopes = config.get("scopes") or ["all"]
    own = config.get("scope_directions") == "own"
    return (f"scopes {', '.join(scopes)} ({'each component its own direction' if own else 'best component direction'}); "
            f"selection hook points {config.get('selection_hook_points', 'full')}; protocol {config.get('protocol', 'ours')}")


def _timings_text(timings: dict) -> str:
    """"extract 4.5 s, select 2.7 s (total 7.2 s)" or "n/a"."""
    if not timings:
        return "n/a"
    parts = [f"{stage} {fmt_num(t, 1)} s" for stage, t in timings.items()]
    total = sum(t for t in timings.values() if is_number(t))
    return ", ".join(parts) + f" (total {total:.1f} s)"


# ====================================================================== summary sections
def read_first(page: Page, art: RunArtifacts) -> None:
    """The "Read this first" box; nothing when there is no warning."""
    warnings = read_first_warnings(art)
    if warnings:
        page.add(ReadFirst(tuple(warnings)))


def results_table(page: Page, art: RunArtifacts) -> None:
    """Every intervention × metric, with intervals, stars, not-run footnotes and what each intervention does."""
    summary = art.summary
    page.section("Interventions × metrics", "results")
    if summary is None:
        page.para("No evaluate/summary.json: the evaluation stage has not run, so there are no metrics yet.", "missing")
        if art.plan:
            page.para("Planned interventions (infer/plan.json):")
            page.bullets([f"{s.get('name')}: {describe_intervention(s)}" for s in art.plan])
        return
    names = intervention_names(summary)
    specs = {s.get("name"): s for s in summary.get("interventions") or []}
    page.para(statistics_legend(summary) + " ↓ lower is better, ↑ higher is better. "
              "⚠ marks a benchmark whose baseline interval includes chance.", "small")
    page.add(metrics_table(summary, names, specs))
    page.subsection("What each intervention does")
    page.bullets([f"{name}: {describe_intervention(specs.get(name) or {})}" for name in names])


def metrics_table(summary: dict, names: list[str], specs: dict) -> Table:
    """The interventions × metrics table of one summary (rows: interventions, baseline first)."""
    metrics = ordered_metrics(summary)
    flags = {m for m, f in (summary.get("chance_flags") or {}).items() if (f or {}).get("flagged")}
    header = (Cell("intervention"), *(Cell(metric_label(summary, m) + better_arrow(summary, m) + (" ⚠" if m in flags else ""),
                                           sub=m) for m in metrics))
    footnotes: dict[str, int] = {}
    rows = [Row((Cell(name, tip=describe_intervention(specs.get(name) or {})),
                 *(metric_cell(summary_cell(summary, name, m), footnotes, name == "baseline") for m in metrics)),
                css="baseline" if name == "baseline" else "") for name in names]
    return Table(header, rows, css="results", scroll=True, footnotes=not_run_notes(footnotes))


def chance_section(page: Page, art: RunArtifacts) -> None:
    """Per benchmark, whether its baseline interval is above chance."""
    summary = art.summary
    if summary is None:
        return
    flags = summary.get("chance_flags") or {}
    page.section("Benchmarks vs chance", "chance")
    if not flags:
        page.para("No chance checks in the summary.", "small")
        return
    for mid, flag in flags.items():
        flag = flag or {}
        label = metric_label(summary, mid)
        ci = format_interval(flag.get("baseline_ci")) or "n/a"
        base = summary_cell(summary, "baseline", mid) or {}
        value = fmt_num(base.get("value")) if base.get("status") == "ok" else "n/a"
        if flag.get("flagged"):
            page.add(Quote(f"⚠ {label} ({mid}): baseline {value} {ci} includes chance ({fmt_num(flag.get('chance'))}): "
                           "this benchmark cannot show capability damage for this model.", "flag"))
        else:
            page.para(f"{label} ({mid}): baseline {value} {ci} is above chance ({fmt_num(flag.get('chance'))}).", "small")


def per_category_section(page: Page, art: RunArtifacts) -> None:
    """Attack success per harm category, one table per harmful set (columns: interventions)."""
    per_cat = (art.summary or {}).get("per_category") or {}
    if not per_cat:
        return
    page.section("Attack success per category", "categories")
    ordered = intervention_names(art.summary or {})
    names = [n for n in ordered if n in per_cat] + [n for n in per_cat if n not in ordered]
    datasets: list[str] = []
    for n in names:
        datasets += [d for d in per_cat[n] if d not in datasets]
    for dataset in datasets:
        cats: list[str] = []
        for n in names:
            cats += [c for c in (per_cat[n].get(dataset) or {}) if c not in cats]
        page.subsection(dataset)
        rows = [Row((Cell(cat), *(Cell(_category_text((per_cat[n].get(dataset) or {}).get(cat) or {}), css="num")
                                  for n in names))) for cat in cats]
        page.add(Table((Cell("category"), *(Cell(n) for n in names)), rows, scroll=True))


def agreement_section(page: Page, art: RunArtifacts) -> None:
    """Judge agreement per harmful set: percent agreement (upper triangle) and Cohen's kappa (lower
    triangle) of every pair of judges, each judge's positive rate, and the most disputed completions."""
    blocks = (art.summary or {}).get("judge_agreement") or {}
    blocks = {d: b for d, b in blocks.items() if len(b.get("judges") or []) >= 2}
    if not blocks:
        return
    page.section("Judge agreement", "agreement")
    page.para("Above the diagonal: share of completions on which two judges agree; below: Cohen's kappa "
              "(n/a where undefined, e.g. a judge that gives one verdict only). Counted over every "
              "intervention's completions that both judges judged.")
    for dataset, block in blocks.items():
        judges = block["judges"]
        agree, kappa = block["matrix"]["agreement"], block["matrix"]["kappa"]
        page.subsection(f"{dataset} ({block.get('n_completions', '?')} completions)")
        rows = []
        for i, a in enumerate(judges):
            cells = [Cell(f"{a}: {(block.get('labels') or {}).get(a, '')}")]
            cells.append(Cell(f"{fmt_num((block.get('positive_rate') or {}).get(a), 2)} "
                              f"(n={(block.get('n_judged') or {}).get(a, '?')})", css="num"))
            for j in range(len(judges)):
                value = None if i == j else (agree[i][j] if j > i else kappa[i][j])
                cells.append(Cell("—" if i == j else fmt_num(value, 2), css="num"))
            rows.append(Row(tuple(cells)))
        page.add(Table((Cell("judge (True means)"), Cell("positive rate"), *(Cell(j) for j in judges)), rows))
        disputed = block.get("disagreements") or []
        if disputed:
            page.bullets([_disputed_text(d) for d in disputed])


def _disputed_text(entry: dict) -> str:
    """One disputed completion: intervention, each judge's verdict, the prompt and the judged text (cut)."""
    verdicts = ", ".join(f"{k} {'yes' if v else 'no' if v is not None else 'n/a'}"
                         for k, v in (entry.get("verdicts") or {}).items())
    text = " ".join(str(entry.get("text", "")).split())[:200]
    return f"{entry.get('intervention')} #{entry.get('index')}: {verdicts}. Prompt: {entry.get('prompt')!s:.120} — \"{text}\""


def _category_text(entry: dict) -> str:
    """"0.50 (n=4)" or "—" for a missing category entry."""
    return f"{fmt_num(entry.get('attack_success'), 2)} (n={entry.get('n', '?')})" if entry else "—"


# ====================================================================== figure sections
def pareto_section(page: Page, art: RunArtifacts) -> None:
    """Attack success against cross-entropy, one point per intervention."""
    summary = art.summary
    if summary is None:
        return
    page.section("Refusal vs cross-entropy", "pareto")
    metrics = summary.get("metrics") or {}
    datasets = [d for d in harmful_datasets(art) if f"attack_success/{d}" in metrics]
    if not datasets:
        page.para("No attack-success metric in the summary: nothing to plot.", "small")
        return
    y_id, y2_id = f"attack_success/{datasets[0]}", f"coherent_attack_success/{datasets[0]}"
    names = intervention_names(summary)
    x_id = next((m for m in CE_METRICS if m in metrics
                 and any((summary_cell(summary, n, m) or {}).get("status") == "ok" for n in names)), None)
    if x_id is None:
        page.para("No cross-entropy metric was computed: the Pareto plot is left out.", "small")
        return
    points, skipped = _pareto_points(summary, names, x_id, y_id, y2_id)
    base = summary_cell(summary, "baseline", x_id) or {}
    baseline_x = float(base["value"]) if base.get("status") == "ok" and is_number(base.get("value")) else None
    if points:
        fig = pareto_figure(points, f"{metric_label(summary, x_id)} ({x_id}, nats/token)",
                            f"{metric_label(summary, y_id)} ({y_id})", baseline_x)
        shown = f"{y_id} (filled) and {y2_id} (hollow)" if any("y2" in p for p in points) else y_id
        page.add(image("pareto", figure_png(fig), f"{shown} vs {x_id}, one point per intervention (bars: 95% intervals)"))
    if skipped:
        page.para(f"Not plotted (a metric not run or n/a): {', '.join(skipped)}.", "small")


def _pareto_points(summary: dict, names: list[str], x_id: str, y_id: str, y2_id: str) -> tuple[list[dict], list[str]]:
    """The plotted points (``pareto_figure``'s format) and the names left out for want of a number."""
    specs = {s.get("name"): s for s in summary.get("interventions") or []}
    points, skipped = [], []
    for name in names:
        x, y = summary_cell(summary, name, x_id) or {}, summary_cell(summary, name, y_id) or {}
        if x.get("status") == "ok" and y.get("status") == "ok" and is_number(x.get("value")) and is_number(y.get("value")):
            point = {"name": name, "method": (specs.get(name) or {}).get("method"), "x": float(x["value"]),
                     "x_ci": x.get("ci"), "y": float(y["value"]), "y_ci": y.get("ci")}
            y2 = summary_cell(summary, name, y2_id) or {}
            if y2.get("status") == "ok" and is_number(y2.get("value")):
                point.update(y2=float(y2["value"]), y2_ci=y2.get("ci"))
            points.append(point)
        else:
            skipped.append(name)
    return points, skipped


def sweep_section(page: Page, art: RunArtifacts) -> None:
    """Dose-response per method on the selection proxies (``sweep/<method>.json``); nothing without a sweep."""
    if not art.sweeps:
        return
    page.section("Dose-response on the selection proxies", "sweeps")
    n_val = next(iter(art.sweeps.values())).get("n_val") or {}
    page.para("No generation: the refusal proxy is selection's bypass score (mean refusal score at the last prompt "
              "position, harmful validation prompts; lower means less refusal) and the KL is KL(baseline || intervened) "
              f"of the next token on the harmless validation prompts (n = {n_val.get('harmful', '?')} harmful, "
              f"{n_val.get('harmless', '?')} harmless), each under the method's selected direction. Strength λ: "
              "x − λ U Wᵀ (x − b) at every layer in scope (λ = 1 is the removal); one line per scope.", "small")
    for method, doc in art.sweeps.items():
        page.add(image(f"sweep_{method}", figure_png(sweep_figure(doc["records"], method)),
                       f"{METHOD_LABELS.get(method, method)}: refusal proxy and KL against strength, per scope"))


def _fronts(art: RunArtifacts) -> dict[str, list[dict]]:
    """Each method's Pareto-front trials (``optimize/<method>.json``'s ``front`` indices)."""
    return {m: [r for r in doc["trials"] if r["index"] in set(doc.get("front") or [])] for m, doc in art.searches.items()}


MATCHED_METRICS = ("attack_success/{d}", "coherent_attack_success/{d}", "harmless_refusal", "ce/general", "ce/alpaca",
                   "mmlu", "arc_challenge/acc", "kl/harmless")


def search_section(page: Page, art: RunArtifacts) -> None:
    """The Pareto fronts of every method's search (one figure) and the matched-damage table: per KL
    level, each method's front point nearest that KL, evaluated fully (``<method>.front-kl<level>``)."""
    if not art.searches:
        return
    page.section("Pareto search and matched damage", "search")
    levels = [float(v) for v in art.config.get("search_kl_levels") or []]
    fronts = _fronts(art)
    budget = {m: len(doc["trials"]) for m, doc in art.searches.items()}
    page.para(f"Multi-objective TPE over a per-layer weight kernel (peak layer, peak weight, minimum weight, width; INLP "
              f"also k), minimising the refusal proxy and the KL; trials per method: "
              f"{', '.join(f'{METHOD_LABELS.get(m, m)} {n}' for m, n in budget.items())}.", "small")
    trials = {m: doc["trials"] for m, doc in art.searches.items()}
    page.add(image("search_fronts", figure_png(fronts_figure(trials, fronts, levels)), "Pareto fronts of every method"))
    for level in levels:
        _matched_table(page, art, level, {m: matched_damage(f, [level])[level] for m, f in fronts.items()})


def _matched_table(page: Page, art: RunArtifacts, level: float, chosen: dict[str, dict | None]) -> None:
    """One KL level's table: a row per method (its chosen front point and the evaluated metrics)."""
    page.subsection(f"KL level {level:g}")
    summary = art.summary or {}
    dataset = next(iter(harmful_datasets(art)), "")
    metrics = [m.format(d=dataset) for m in MATCHED_METRICS if m.format(d=dataset) in (summary.get("metrics") or {})]
    footnotes: dict[str, int] = {}
    rows, far = [], []
    for method, point in chosen.items():
        if point is None:
            continue
        name = f"{method}.front-kl{level:g}"
        far += [METHOD_LABELS.get(method, method)] if point["far"] else []
        rows.append(Row((Cell(METHOD_LABELS.get(method, method), sub=name), Cell(fmt_num(point["kl"]), css="num"),
                         Cell(fmt_num(point["refusal"]), css="num"),
                         *(metric_cell(summary_cell(summary, name, m), footnotes, False) for m in metrics))))
    header = (Cell("method"), Cell("proxy KL"), Cell("proxy refusal"),
              *(Cell(metric_label(summary, m) + better_arrow(summary, m), sub=m) for m in metrics))
    page.add(Table(header, rows, scroll=True, footnotes=not_run_notes(footnotes)))
    if far:
        page.para(f"⚠ No front point near KL {level:g} for {', '.join(far)}: the nearest is more than 2× away.", "small")
    if not metrics:
        page.para("Not evaluated yet: run with --optimize (infer and evaluate) to fill the metrics.", "small")


def _scope_layers_text(art: RunArtifacts, method: str) -> str:
    """``label: layers`` of each scope of ``method``'s removal, from the plan ("n/a" before infer)."""
    scoped = [s for s in art.plan or [] if s.get("method") == method and s.get("kind") == "removal"
              and s.get("affine", True)]
    if not scoped:
        return "n/a"
    return "; ".join(f"{s.get('scope') or 'layers'}: {compress_layers(s.get('layers') or [])}" for s in scoped)


SELECTION_COLUMNS = ("method", "position", "layer", "bypass", "steering", "KL", "INLP dev acc", "INLP k", "scope layers",
                     "filters", "skipped", "val harmful/harmless", "Spearman local/global")


def selection_section(page: Page, art: RunArtifacts) -> None:
    """Each method's selected component (a table) and its score heatmaps."""
    page.section("Selection: scores per (position, layer)", "selection")
    if not art.selections:
        page.para("No select/<method>.json: the selection stage has not run.", "missing")
        return
    rows = [Row(tuple(Cell(v) for v in _selection_row(art, method))) for method in art.selections]
    page.add(Table(tuple(Cell(c) for c in SELECTION_COLUMNS), rows))
    page.para("★ / red box: the selected component; hatched cells: filtered out (KL above threshold, negative "
              "steering, late layer or an undefined score); grey: no score.", "small")
    n_layers = int(art.model.get("n_layers") or 0)
    positions = (art.geometry or {}).get("positions") or art.config.get("positions")
    for method, sel in art.selections.items():
        label = METHOD_LABELS.get(method, method)
        page.subsection(label)
        gallery = page.gallery()
        for metric in SELECTION_METRICS:
            fig = selection_figure(sel, metric, n_layers, positions)
            gallery.images.append(image(f"select_{method}_{metric}", figure_png(fig), f"{label} {metric} per (position, layer)"))


def _selection_row(art: RunArtifacts, method: str) -> tuple[str, ...]:
    """The SELECTION_COLUMNS of one method's selected component."""
    sel = art.selections[method]
    best = sel.best
    n_val = art.selection_raw.get(method, {}).get("n_val") or {}
    return (METHOD_LABELS.get(method, method), str(best.position), str(best.layer), fmt_num(best.bypass),
            fmt_num(best.steering), fmt_num(best.kl, 4), fmt_num(best.accuracy) if best.accuracy is not None else "—",
            str(best.k) if method == "inlp" else "—", _scope_layers_text(art, method),
            ", ".join(best.filtered_out) or "passed", str(len(sel.skipped)),
            f"{n_val.get('harmful', '?')}/{n_val.get('harmless', '?')}" if n_val else "n/a",
            fmt_num(sel.spearman) if sel.spearman is not None else "—")


def inlp_section(page: Page, art: RunArtifacts) -> None:
    """INLP's dev-accuracy curves and rank map (only when the geometry has them)."""
    geo = art.geometry or {}
    if "inlp_rank" not in geo and "inlp_accuracies" not in geo:
        return
    page.section("INLP", "inlp")
    positions = geo.get("positions") or []
    sel = art.selections.get("inlp")
    if "inlp_accuracies" in geo:
        acc = np.asarray(geo["inlp_accuracies"], dtype=float)
        selected = (sel.best.pos_index, sel.best.layer) if sel else None
        threshold = art.config.get("inlp_min_accuracy")
        fig = inlp_accuracy_figure(acc, positions or list(range(acc.shape[0])), _inlp_components(acc, sel), selected,
                                   threshold if is_number(threshold) else None)
        page.add(image("inlp_accuracy_curves", figure_png(fig),
                       "INLP dev accuracy vs classifier index (selected component and the next-ranked ones)"))
    if "inlp_rank" in geo:
        k = np.asarray(geo["inlp_rank"], dtype=float)  # the geometry artifact calls INLP's k "inlp_rank"
        fig = heatmap_figure(k, positions or list(range(k.shape[0])), "INLP k (classifiers in P) per (position, layer)",
                             "k", cmap="Blues", vmin=0, best=(sel.best.pos_index, sel.best.layer) if sel else None,
                             value_format="{:.0f}")
        page.add(image("inlp_rank", figure_png(fig), "INLP k per (position, layer)"))


def _inlp_components(acc: np.ndarray, sel: MethodSelection | None) -> list[tuple[int, int]]:
    """The selected component, then the next-ranked ones (by first accuracy without a selection), 5 at most."""
    selected = (sel.best.pos_index, sel.best.layer) if sel else None
    components: list[tuple[int, int]] = [selected] if selected else []
    ranked = [(c.pos_index, c.layer) for c in sel.ranked] if sel else [
        tuple(int(i) for i in divmod(int(j), acc.shape[1]))
        for j in np.argsort(-np.nan_to_num(acc[..., 0], nan=-1).ravel(), kind="stable")]
    for comp in ranked:
        if len(components) >= 5:
            break
        if comp not in components:
            components.append(comp)
    return components


def geometry_section(page: Page, art: RunArtifacts) -> None:
    """Heatmaps comparing the methods' directions per (position, layer)."""
    geo = art.geometry
    page.section("Geometry: how the methods' directions relate", "geometry")
    if geo is None:
        page.para("No extract/geometry.json: the extraction stage has not run.", "missing")
        return
    present = [g for g in GEOMETRY_PLOTS if g[0] in geo]
    if not present:
        page.para("Only diff-in-means was extracted: nothing to compare.", "small")
        return
    positions = geo.get("positions") or []
    gallery = page.gallery()
    for key, title, label, cmap, vmin, vmax in present:
        grid = np.asarray(geo[key], dtype=float)
        fig = heatmap_figure(grid, positions or list(range(grid.shape[0])), title, label, cmap=cmap, vmin=vmin, vmax=vmax)
        gallery.images.append(image(f"geometry_{key}", figure_png(fig), title))


INTERVENTION_GEOMETRY_COLUMNS = ("intervention", "layer", "harmful t", "harmful probe: harmless", "harmful → harmful mean",
                                 "harmful → harmless mean", "harmful lands", "harmless t", "harmless probe: harmless",
                                 "harmless lands")


def intervention_geometry_section(page: Page, art: RunArtifacts) -> None:
    """Where each intervention moves the validation activations: the numbers table and a scatter plot per layer."""
    geo = art.intervention_geometry
    if geo is None:
        return
    settings = geo.get("settings") or {}
    page.section("Geometry of interventions: where the activations land", "intervention-geometry")
    n = settings.get("n_val") or {}
    page.para(f"Validation activations ({n.get('harmful', '?')} harmful, {n.get('harmless', '?')} harmless prompts) "
              f"entering each layer at position {settings.get('position', '?')}, before and under each intervention. "
              "t: the mean position along the axis from the clean harmful mean (0) to the clean harmless mean (1); "
              "probe: the fraction that a logistic probe fitted on the clean train activations calls harmless; "
              "distances: mean Euclidean distance to each clean class mean, divided by the distance between the means. "
              "Lands: own cluster (moved < 0.25 of the way to the other mean), between (< 0.75) or opposite cluster.", "small")
    rows = [Row(tuple(Cell(v) for v in _geometry_row("baseline", layer, cell))) for layer, cell in (geo.get("clean") or {}).items()]
    rows += [Row(tuple(Cell(v) for v in _geometry_row(e["name"], layer, cell)))
             for e in geo.get("interventions") or [] for layer, cell in e.get("layers", {}).items()]
    page.add(Table(tuple(Cell(c) for c in INTERVENTION_GEOMETRY_COLUMNS), rows, scroll=True))
    for layer in geo.get("clean") or {}:
        page.add(image(f"intervention_geometry_layer{layer}", figure_png(intervention_geometry_figure(geo, layer)),
                       f"layer {layer}: clean (pale) and intervened (dark) validation activations in the "
                       "diff-in-means / top principal component plane"))


def _geometry_row(name: str, layer: str, cell: dict) -> tuple[str, ...]:
    """The INTERVENTION_GEOMETRY_COLUMNS of one intervention (or the clean baseline) at one layer."""
    h, b = cell.get("harmful") or {}, cell.get("harmless") or {}
    return (name, layer, fmt_num(h.get("axis_position")), fmt_num(h.get("fraction_called_harmless")),
            fmt_num(h.get("distance_to_harmful_mean_normalised")), fmt_num(h.get("distance_to_harmless_mean_normalised")),
            str(h.get("verdict", "n/a")), fmt_num(b.get("axis_position")), fmt_num(b.get("fraction_called_harmless")),
            str(b.get("verdict", "n/a")))


# ====================================================================== examples and notes
def examples_section(page: Page, art: RunArtifacts) -> None:
    """The first harmful completions per intervention, with the judge's verdict and coherence."""
    page.section("Example completions", "examples")
    examples, source = _examples(art)
    if not examples:
        page.para("No completions yet: the generation stage has not run.", "missing")
        return
    page.para(f"First harmful prompts per intervention, from {source}.", "small")
    for name, rows in examples.items():
        group = ExampleGroup(name, name == "baseline", len(rows))
        page.add(group)
        group.examples.extend(_example(row) for row in rows)


def _example(row: dict) -> Example:
    """One example row of the summary (or of the raw completions) as a page-model example."""
    verdict, css = ({True: ("refused", "verdict-refused"), False: ("not refused", "verdict-complied")}
                    .get(row.get("refused"), ("not judged", "verdict-unknown")))
    return Example(str(row.get("dataset", "")), visible_text(row.get("prompt", "")), visible_text(row.get("response", "")),
                   verdict, css, example_coherence_text(row))


def _examples(art: RunArtifacts, per_intervention: int = 3) -> tuple[dict[str, list[dict]], str]:
    """First harmful examples per intervention, from the summary, else from the raw completions."""
    harmful = harmful_datasets(art)
    harmless = art.config.get("harmless_eval", "harmless_test")
    examples = (art.summary or {}).get("examples") or {}
    if examples:
        names = intervention_names(art.summary or {})
        out = {}
        for name in [*[n for n in names if n in examples], *[n for n in examples if n not in names]]:
            chosen = [r for r in examples.get(name) or []
                      if r.get("dataset") != harmless and (not harmful or r.get("dataset") in harmful)]
            if chosen:
                out[name] = chosen[:per_intervention]
        return out, "evaluate/summary.json (substring judge)"
    return _completion_examples(art, harmful, per_intervention), \
        "the generated completions (not judged yet: the evaluation stage has not run)"


def _completion_examples(art: RunArtifacts, harmful: list[str], per_intervention: int) -> dict[str, list[dict]]:
    """Unjudged examples from ``infer/<intervention>/<dataset>.jsonl`` (the first harmful set that has rows)."""
    out = {}
    for spec in art.plan or []:
        name = str(spec.get("name"))
        for dataset in harmful:
            path = art.dir / "infer" / name / f"{dataset}.jsonl"
            try:
                rows = read_jsonl(path) if path.exists() else []
            except (OSError, ValueError):
                rows = []
            if rows:
                out[name] = [{"dataset": dataset, "prompt": r.get("prompt", ""), "response": r.get("response", ""),
                              "refused": None} for r in rows[:per_intervention]]
                break
    return out


def example_coherence_text(row: dict) -> str:
    """The coherence verdict and figures of one example ("" when the summary has none):
    ``degenerate (repetition, ce); repetition 0.67, longest repeat 12 words, CE 4.12 nats/token (unmodified model); refusal onset: delayed``."""
    if "degenerate" not in row:
        return ""
    reasons = row.get("degenerate_reasons") or []
    parts = [("degenerate" + (f" ({', '.join(map(str, reasons))})" if reasons else "")) if row["degenerate"] else "coherent"]
    figures = row.get("coherence") or {}
    numbers = []
    if is_number(figures.get("repetition")):
        numbers.append(f"repetition {fmt_num(figures['repetition'], 2)}")
    if is_number(figures.get("longest_repeat_words")):
        numbers.append(f"longest repeat {int(figures['longest_repeat_words'])} words")
    if is_number(figures.get("ce")):
        numbers.append(f"CE {fmt_num(figures['ce'], 2)} nats/token (unmodified model)")
    else:
        numbers.append("CE n/a")
    parts.append(", ".join(numbers))
    if row.get("refusal_onset") in ("start", "delayed"):
        parts.append(f"refusal onset: {row['refusal_onset']}")
    return "; ".join(parts)


def notes(art: RunArtifacts) -> list[str]:
    """The Notes section's items: missing stages, fallbacks, summary notes, chance flags, metrics not
    run, the reflection mode, then the loader's and the failed sections' notes."""
    found = []
    if art.missing_stages:
        found.append(f"Missing stages: {', '.join(art.missing_stages)} (the report shows what exists).")
    for method, raw in art.selection_raw.items():
        if raw.get("fallback_warning"):
            found.append(f"Selection fallback: {raw['fallback_warning']}")
    summary = art.summary or {}
    found += [str(n) for n in summary.get("notes") or []]
    for mid, flag in (summary.get("chance_flags") or {}).items():
        if (flag or {}).get("flagged"):
            found.append(f"{metric_label(summary, mid)} ({mid}): baseline interval includes chance; it cannot show capability damage here.")
    found += _not_run_notes(summary)
    if art.config.get("reflection_mode") and any(s.get("kind") == "reflection" for s in art.plan or []):
        found.append(f"Reflection interventions use the {art.config['reflection_mode']!r} mode.")
    return found + art.notes


def _not_run_notes(summary: dict) -> list[str]:
    """One note per (metric, reason) not run, naming the interventions (or "all interventions")."""
    not_run: dict[tuple[str, str], list[str]] = {}
    names = intervention_names(summary)
    for name in names:
        for mid in ordered_metrics(summary):
            cell = summary_cell(summary, name, mid)
            if cell and cell.get("status") != "ok":
                not_run.setdefault((mid, str(cell.get("reason") or "no reason given")), []).append(name)
    return [f"Not run: {metric_label(summary, mid)} ({mid}) for "
            f"{'all interventions' if len(who) == len(names) else ', '.join(who)}: {reason}"
            for (mid, reason), who in not_run.items()]


def notes_section(page: Page, art: RunArtifacts) -> None:
    """The Notes: every caveat of the run (always last: it lists the sections that failed)."""
    page.section("Notes", "notes")
    found = notes(art)
    if found:
        page.bullets(found, "warn")
    else:
        page.para("No warnings.")


# ====================================================================== the report
# The sections in page order. Adding a section to both pages: write a builder above and list it here.
SECTIONS: tuple[tuple[str, Section], ...] = (
    ("read first", read_first),
    ("results table", results_table),
    ("chance section", chance_section),
    ("pareto section", pareto_section),
    ("search section", search_section),
    ("sweep section", sweep_section),
    ("selection section", selection_section),
    ("inlp section", inlp_section),
    ("geometry section", geometry_section),
    ("intervention geometry section", intervention_geometry_section),
    ("per category section", per_category_section),
    ("judge agreement section", agreement_section),
    ("examples section", examples_section),
)


def build_report(art: RunArtifacts) -> Page:
    """The report page of a run: the header, every section of SECTIONS, then the Notes."""
    evaluated = art.evaluate_model
    page = Page(evaluate_model_title(evaluated) if evaluated
                else f"Refusal directions report: {art.model.get('name', art.dir.name)}")
    header(page, art)
    for name, build in SECTIONS:
        try:
            build(page, art)
        except Exception as err:  # one broken artifact must not cost the whole report
            log.warning("Report section %s failed: %r", name, err, exc_info=True)
            art.notes.append(f"The {name} could not be rendered: {err!r}")
    notes_section(page, art)
    return page
