"""The HTML/Markdown report of a run: tables, warnings, escaping, images, partial runs, examples."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_fixtures import (NAN, NOT_RUN_REASON, PNG_MAGIC, SCRIPT_RESPONSE, METRICS, TableParser,
                             expected_mark, write_fixture_run)

from refusal_directions.report import (compare_runs, significance_mark, write_report, compress_layers, load_run,
                                       read_first_warnings)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str, str]:
    folder = write_fixture_run(tmp_path_factory.mktemp("run") / "run")
    html_path, md_path = write_report(folder)
    return folder, html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


# ====================================================================== tests
def test_significance_marks_and_layers():
    assert [significance_mark(p) for p in (0.0009, 0.001, 0.009, 0.01, 0.049, 0.05, None, NAN)] == \
        ["***", "**", "**", "*", "*", "", "", ""]
    assert compress_layers([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8"


def test_report_table_has_every_intervention_and_metric(full_report):
    folder, page, _ = full_report
    summary = json.loads((folder / "evaluate" / "summary.json").read_text())
    parser = TableParser()
    parser.feed(page)
    header, *rows = parser.rows
    metric_ids = list(METRICS)
    # header: "intervention" then one column per metric (label + id)
    assert len(header) == 1 + len(metric_ids)
    header_ids = [text.split()[-1] for text, _ in header[1:]]
    assert sorted(header_ids) == sorted(metric_ids)
    assert [r[0][0] for r in rows] == [s["name"] for s in summary["interventions"]]
    assert rows[0][0][0] == "baseline"
    for row in rows:
        name = row[0][0]
        for (text, attrs), mid in zip(row[1:], header_ids):
            cell = summary["results"][name][mid]
            if cell["status"] != "ok":
                assert text.startswith("not run") and attrs.get("title") == cell["reason"]
                assert not re.search(r"\d\.\d", text)
                continue
            if math.isnan(cell["value"]):
                assert text == "n/a", text
                continue
            lo, hi = cell["ci"]
            expected = f"{cell['value']:.3f} [{lo:.3f}, {hi:.3f}]"
            mark = "" if name == "baseline" else expected_mark(cell["p_vs_baseline"])
            assert text == (f"{expected} {mark}" if mark else expected), (name, mid, text)
    marks = {expected_mark(c.get("p_vs_baseline")) for n, r in summary["results"].items() if n != "baseline"
             for c in r.values() if c["status"] == "ok"}
    assert {"*", "**", "***", ""} <= marks  # the fixture exercises every level
    text_only = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "NaN" not in text_only and "nan" not in text_only.lower().replace("nanc", "")


def test_report_not_run_chance_flags_notes_and_escaping(full_report):
    _, page, md = full_report
    assert html.escape(NOT_RUN_REASON) in page  # footnote and tooltip
    assert "cannot show capability damage" in page
    assert re.search(r'class="flag">[^<]*MMLU', page)
    assert not re.search(r'class="flag">[^<]*ARC-Challenge acc', page)
    # responses are escaped: no <script> survives in the page, the escaped text does
    assert "<script" not in page.lower()
    assert html.escape(SCRIPT_RESPONSE) in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    # three harmful examples per intervention (not the harmless one), with the judge's verdict
    assert page.count("Harmful prompt 0 for baseline") == 1 and "Harmful prompt 3 for baseline" not in page
    assert "Give three tips" not in page
    assert "not refused" in page and ">refused<" in page
    # notes: selection fallback, the general-text corpus, metrics not run
    notes = page[page.index('id="notes"'):]
    assert "Selection fallback: inlp" in notes
    assert "LAMBADA" in notes
    assert "Not run: LlamaGuard unsafe (JailbreakBench)" in notes
    # header essentials
    for text in ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "0123456789abcdef", "quick", "evaluate 31.0 s", "n_train 64"):
        assert text in page
    # Markdown: same table, footnoted not-run cells, PNGs saved beside it
    assert "| baseline |" in md and "not run [1]" in md
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (Path(full_report[0]) / "report" / name).read_bytes().startswith(PNG_MAGIC)
    # in Markdown the response sits verbatim in a fenced code block (inert); nowhere else
    assert SCRIPT_RESPONSE in md
    outside_fences = re.sub(r"(`{3,})text\n.*?\n *\1", "", md, flags=re.S)
    assert "<script" not in outside_fences and "&lt;script&gt;" not in outside_fences


READ_FIRST_FIXTURE = [
    "Selection fallback: inlp: no candidate passed the filters (kl>0.1); using the best unfiltered candidate "
    "(position -2, layer 5). The INLP rows use a component that failed the selection filters.",
    "Thin evaluation sets (under 50 items): n=32: attack_success/jailbreakbench, attack_success/advbench, harmless_refusal, "
    "mmlu, arc_challenge/acc, arc_challenge/acc_norm. With n=32 a 95% interval around 0.5 spans about ±0.16: only large "
    "differences can show as significant.",
    "Chance level: MMLU (5-shot) (mmlu): the baseline's interval [0.070, 0.270] includes chance (0.25); this benchmark "
    "cannot show capability damage for this model.",
]


def test_read_first_box_stands_above_the_tables(full_report):
    folder, page, md = full_report
    assert read_first_warnings(load_run(folder)) == READ_FIRST_FIXTURE
    box = re.search(r'<div class="read-first" id="read-first"><h2>⚠ Read this first</h2><ul>(.*?)</ul></div>', page)
    assert box and re.findall(r"<li>(.*?)</li>", box.group(1)) == [html.escape(w) for w in READ_FIRST_FIXTURE]
    assert box.start() < page.index('id="results"') < page.index('id="notes"')
    assert ".read-first {" in page  # styled
    assert md.index("> **⚠ Read this first**\n>\n" + "\n".join(f"> - {w}" for w in READ_FIRST_FIXTURE) + "\n") \
        < md.index("## Interventions × metrics")


def test_read_first_warns_about_thin_selection_sets_and_a_baseline_at_the_ceiling(tmp_path):
    folder = write_fixture_run(tmp_path / "run")
    for method in ("diff_in_means", "leace"):
        path = folder / "select" / f"{method}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "n_val": {"harmful": 7, "harmless": 30}}))
    (folder / "extract" / "prompts.json").write_text(json.dumps(
        {"key": "e" * 12, "harmful_val": [{"instruction": f"h{i}"} for i in range(32)],
         "harmless_val": [{"instruction": f"b{i}"} for i in range(32)]}))
    path = folder / "evaluate" / "summary.json"
    summary = json.loads(path.read_text())
    base = summary["results"]["baseline"]
    base["attack_success/advbench"].update(value=0.95, ci=[0.83, 0.99])
    base["attack_success/jailbreakbench"].update(value=0.89, ci=[0.74, 0.96])  # under the ceiling
    for cell in base.values():
        if cell["status"] == "ok":
            cell["n"] = 64
    summary["chance_flags"]["mmlu"]["flagged"] = False
    path.write_text(json.dumps(summary))
    assert read_first_warnings(load_run(folder)) == [
        READ_FIRST_FIXTURE[0],
        "Thin selection set: diff-in-means, LEACE ranked candidates on 7 harmful and 30 harmless validation prompts "
        "(of 32 and 32 drawn, after the refusal filter); with under 16 the bypass and KL scores are noisy and the chosen "
        "component may change with the sample. Draw more with --n-val (and --val-from-train beyond the 39 prompts of "
        "harmful_val).",
        "Ceiling: baseline attack success on advbench is already 0.950 [0.830, 0.990] (warned at 0.9 or an interval "
        "reaching 1): the model rarely refuses these prompts, so there is little refusal to remove and this column "
        "cannot show what removal does.",
    ]
    # (the report's box is checked above; write_report renders every plot, compare_runs none)
    compared = compare_runs([folder], tmp_path / "compare.html").read_text()
    assert compared.index("R1: Thin selection set: diff-in-means, LEACE") < compared.index('class="results"')
    assert compared.index("R1: Ceiling: baseline attack success on advbench") < compared.index('class="results"')


def test_legend_and_tooltips_say_the_p_values_are_holm_adjusted(full_report):
    from refusal_directions.report import statistics_legend

    folder, page, md = full_report
    summary = json.loads((folder / "evaluate" / "summary.json").read_text())
    m = summary["p_adjustment"]["m"]
    legend = ("Value [95% interval: Wilson score for rates and accuracies, percentile bootstrap for means (cross-entropy "
              "over documents, token-weighted; KL)]; significance of the difference from baseline (McNemar's exact test on "
              f"paired outcomes, paired bootstrap for cross-entropy), p-values Holm-adjusted over all {m} tests of this table "
              "(every intervention × metric; the unadjusted ones are p_raw in evaluate/summary.json): "
              "* p<0.05, ** p<0.01, *** p<0.001.")
    assert statistics_legend(summary) == legend
    assert html.escape(legend) in page and legend in md
    cell = summary["results"]["diff_in_means.ablation"]["attack_success/jailbreakbench"]
    assert f"p vs baseline = {cell['p_vs_baseline']:.2g} Holm-adjusted (raw {cell['p_raw']:.2g}, mcnemar)" in page
    # a summary written before intervals and adjustment were recorded is described as it is
    old = {"results": {"x": {"a": {"status": "ok", "value": 0.5, "ci": [0.4, 0.6], "p_vs_baseline": 0.01}}}}
    assert statistics_legend(old).startswith("Value [95% bootstrap interval]; ")
    assert "p-values not adjusted for multiple comparisons: " in statistics_legend(old)


def test_report_images_are_embedded_pngs(full_report):
    _, page, _ = full_report
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # 3 methods x 3 selection metrics, INLP curves + rank, 3 geometry maps, Pareto
    assert len(images) == 9 + 2 + 3 + 1
    assert len(re.findall(r"<img ", page)) == len(images)
    for data in images:
        assert base64.b64decode(data, validate=True).startswith(PNG_MAGIC)
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_of_run_stopped_after_selection(tmp_path, data_dir):
    """A real tiny run (extract + select): the select stage writes its plots, the report says what is missing."""
    from tiny import save_tiny_model

    from refusal_directions import pipeline as P
    from refusal_directions.config import build_config

    model = save_tiny_model(tmp_path / "model", "qwen2")
    cfg, _ = build_config({"model": str(model), "device": "cpu", "data_dir": str(data_dir), "output_dir": str(tmp_path / "runs"),
                           "n_train": 8, "n_val": 2, "n_test": 2, "filter_train": False, "max_new_tokens": 4,
                           "positions": [-2, -1], "methods": ["diff_in_means", "leace"]}, gpu_available=False)
    run = P.open_run(cfg)
    P.select(run, P.extract(run))
    plots = sorted(p.name for p in (run.dir / "select" / "plots").glob("*.png"))
    assert plots == sorted(f"{m}_{k}.png" for m in ("diff_in_means", "leace") for k in ("bypass", "kl", "steering"))
    html_path, md_path = write_report(run.dir)
    page = html_path.read_text()
    assert "Stages missing: infer, evaluate" in page
    assert "evaluation stage has not run" in page and "generation stage has not run" in page
    assert len(re.findall(r"data:image/png;base64,", page)) == 6 + 1  # selection maps + LEACE geometry
    assert "Stages missing: infer, evaluate" in md_path.read_text()


def test_report_without_anything_but_a_manifest(tmp_path):
    folder = write_fixture_run(tmp_path / "run", stages="select")
    shutil.rmtree(folder / "select")
    shutil.rmtree(folder / "extract")
    page = write_report(folder)[0].read_text()
    assert "Stages missing: extract, select, infer, evaluate" in page


# ====================================================================== browser
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")

PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target !== window ? (e.target.tagName || 'element') + ' failed to load' : String(e.message);
  window.__errors.push(t);
}, true);
</script>"""
PROBE_TAIL = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {w: i.naturalWidth, h: i.naturalHeight, complete: i.complete};
  });
  var out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({images: imgs, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.browser
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary (install the Debian package `chromium`)")
    _, page, _ = full_report
    probed = page.replace("<head>", "<head>\n" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "\n</body>", 1)
    target = tmp_path / "report_probe.html"
    target.write_text(probed, encoding="utf-8")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", target.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the load probe did not run; stderr: {proc.stderr[-3000:]}"
    probe = json.loads(html.unescape(match.group(1)))
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert probe["errors"] == [] and console == [], (probe["errors"], console)
    assert len(probe["images"]) == 15
    for image in probe["images"]:
        assert image["complete"] and image["w"] > 0 and image["h"] > 0, image


def test_coherence_metrics_in_the_table_the_pareto_plot_and_the_examples(tmp_path):
    from refusal_directions.report import example_coherence_text, pareto_figure

    folder = write_fixture_run(tmp_path / "run")
    path = folder / "evaluate" / "summary.json"
    summary = json.loads(path.read_text())
    new = {"coherent_attack_success/jailbreakbench": "Coherent attack success (not refused, not degenerate), jailbreakbench",
           "degenerate/jailbreakbench": "Degenerate completions (baseline-calibrated), jailbreakbench"}
    metrics = {}
    for mid, meta in summary["metrics"].items():
        metrics[mid] = meta
        if mid == "attack_success/jailbreakbench":
            metrics.update({m: {"label": label, "kind": "rate", "better": None, "group": "refusal"} for m, label in new.items()})
    summary["metrics"] = metrics
    for name, row in summary["results"].items():
        value = row["attack_success/jailbreakbench"]["value"]
        row["coherent_attack_success/jailbreakbench"] = {**row["attack_success/jailbreakbench"], "value": value / 2,
                                                         "ci": [value / 2 - 0.05, value / 2 + 0.05]}
        row["degenerate/jailbreakbench"] = {**row["attack_success/jailbreakbench"], "value": 0.25}
        for ex in summary["examples"][name]:
            ex.update(degenerate=ex["prompt"].startswith("Harmful prompt 0"), refusal_onset="delayed",
                      degenerate_reasons=["repetition", "ce"] if ex["prompt"].startswith("Harmful prompt 0") else [],
                      coherence={"repetition": 0.6667, "longest_repeat_words": 41, "ce": None, "ce_tokens": 0})
    path.write_text(json.dumps(summary))
    html_path, md_path = write_report(folder)
    page, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    table = page[page.index('class="results"'):page.index("</table>", page.index('class="results"'))]
    for label in new.values():
        assert html.escape(label) in table and label in md
    assert "degenerate (repetition, ce); repetition 0.67, longest repeat 41 words, CE n/a; refusal onset: delayed" in page
    assert "coherent; repetition 0.67" in md
    assert "coherent_attack_success/jailbreakbench (hollow)" in page
    text = example_coherence_text({"degenerate": False, "coherence": {"repetition": 0.0, "longest_repeat_words": 0,
                                                                      "ce": 2.5, "ce_tokens": 7}, "refusal_onset": "none"})
    assert text == "coherent; repetition 0.00, longest repeat 0 words, CE 2.50 nats/token (unmodified model)"
    assert example_coherence_text({"refused": True}) == ""
    fig = pareto_figure([{"name": "a", "method": "inlp", "x": 2.0, "x_ci": None, "y": 0.8, "y_ci": [0.7, 0.9],
                          "y2": 0.3, "y2_ci": [0.2, 0.4]}], "x", "y", 2.0)
    assert "coherent attack success (hollow)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_read_first_warns_about_an_llm_judge_that_gives_one_answer_to_everything(tmp_path):
    folder = write_fixture_run(tmp_path / "run")
    path = folder / "evaluate" / "summary.json"
    summary = json.loads(path.read_text())
    names = list(summary["results"])
    summary["metrics"]["rubric_attack_success/jailbreakbench"] = {"kind": "rate", "label": "rubric attack success"}
    for i, name in enumerate(names):
        summary["results"][name]["attack_success/jailbreakbench"].update(status="ok", value=0.2 + 0.8 * (i == 1))
        summary["results"][name]["rubric_attack_success/jailbreakbench"] = {"status": "ok", "value": 0.0, "n": 32}
    path.write_text(json.dumps(summary))
    warnings = [w for w in read_first_warnings(load_run(folder)) if w.startswith("Constant judge")]
    assert len(names) >= 3 and warnings == [
        f"Constant judge: rubric attack success (rubric_attack_success/jailbreakbench) is 0.000 for all {len(names)} "
        "interventions while substring attack success ranges from 0.200 to 1.000: the judge's model likely gives one "
        "answer whatever it reads; do not read this column until its answers are checked (e.g. bench/rubric_run.py --out)."]
    summary["results"][names[1]]["rubric_attack_success/jailbreakbench"]["value"] = 0.5  # the judge varies: no warning
    path.write_text(json.dumps(summary))
    assert not [w for w in read_first_warnings(load_run(folder)) if w.startswith("Constant judge")]
