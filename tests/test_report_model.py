"""The page model: one set of blocks and cells, rendered by the HTML and the Markdown page alike."""

from __future__ import annotations

import json

import pytest
from report_fixtures import NAN, write_fixture_run

from refusal_directions.report import format_cell, sections, write_report
from refusal_directions.report.html_page import render_html
from refusal_directions.report.markdown_page import render_markdown
from refusal_directions.report.model import Cell, Page, Row, Table, image, metric_cell, not_run_notes

CELLS = [
    None,
    {},
    {"status": "not run", "reason": "no judge"},
    {"status": "ok", "value": 0.25, "ci": [0.1, 0.4], "n": 32, "p_vs_baseline": 0.004, "p_raw": 0.001, "test": "mcnemar"},
    {"status": "ok", "value": 0.5, "ci": [0.4, 0.6], "n": 16, "p_vs_baseline": 0.2},
    {"status": "ok", "value": NAN, "ci": [NAN, NAN], "p_vs_baseline": NAN},
]


@pytest.mark.parametrize("is_baseline", [False, True])
def test_a_metric_cell_reads_as_format_cell_says(is_baseline):
    footnotes: dict[str, int] = {}
    for raw in CELLS:
        cell = metric_cell(raw, footnotes, is_baseline)
        if raw and raw.get("status") != "ok":
            assert (cell.plain, cell.css, cell.tip) == ("not run [1]", "notrun", "no judge")
        else:
            assert cell.plain == format_cell(raw, with_mark=not is_baseline)
    assert footnotes == {"no judge": 1} and not_run_notes(footnotes) == ["not run: no judge"]
    tip = metric_cell(CELLS[3], {}, False).tip
    assert tip == "n = 32; p vs baseline = 0.004 Holm-adjusted (raw 0.001, mcnemar)"
    assert metric_cell(CELLS[3], {}, True).tip == "n = 32"


def test_both_pages_render_the_same_table():
    table = Table((Cell("intervention"), Cell("attack success ↑", sub="attack_success/x")),
                  [Row((Cell("baseline", tip="no intervention"), metric_cell(CELLS[4], {}, True)), css="baseline"),
                   Row((Cell("a|b"), metric_cell(CELLS[2], {"no judge": 1}, False)), css="")],
                  css="results", scroll=True, footnotes=["not run: no judge"])
    page = Page("t", [table])
    html = render_html(page)
    assert ('<div class="scroll"><table class="results"><tr><th>intervention</th><th>attack success ↑ '
            '<span class="mid">attack_success/x</span></th></tr>'
            '<tr class="baseline"><td title="no intervention">baseline</td><td class="num" title="n = 16">0.500 '
            '<span class="ci">[0.400, 0.600]</span></td></tr>'
            '<tr class=""><td>a|b</td><td class="notrun" title="no judge">not run<sup>1</sup></td></tr></table></div>\n'
            '<ol class="small footnotes"><li value="1">not run: no judge</li></ol>') in html
    assert render_markdown(page) == ("| intervention | attack success ↑ |\n|---|---|\n| baseline | 0.500 [0.400, 0.600] |\n"
                                     "| a\\|b | not run [1] |\n\n[1] not run: no judge\n")
    headerless = Page("t", [Table(None, [Row((Cell("k"), Cell("<v>")))], css="meta")])
    assert "<table class=\"meta\"><tr><td>k</td><td>&lt;v&gt;</td></tr></table>" in render_html(headerless)
    assert render_markdown(headerless) == "| | |\n|---|---|\n| k | &lt;v&gt; |\n"


def test_page_images_include_the_galleries():
    page = Page("t")
    page.add(image("a b", b"1", "first"))
    page.gallery().images.append(image("c", b"2", "second"))
    assert page.images == {"a_b.png": b"1", "c.png": b"2"}
    assert "![second](c.png)" in render_markdown(page)
    assert '<div class="gallery">\n<figure><img src="data:image/png;base64,Mg==" alt="second">' in render_html(page)


def test_a_section_added_to_sections_appears_in_both_pages(tmp_path, monkeypatch):
    def extra(page, art):
        page.section("Extra", "extra")
        page.add(Table((Cell("run"),), [Row((Cell(art.model["name"]),))]))

    def broken(page, art):
        page.section("Broken", "broken")
        raise ValueError("boom")

    monkeypatch.setattr(sections, "SECTIONS", (*sections.SECTIONS, ("extra section", extra), ("broken section", broken)))
    html_path, md_path = write_report(write_fixture_run(tmp_path / "run"))
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    assert html.index('<h2 id="examples">') < html.index('<h2 id="extra">Extra</h2>\n<table><tr><th>run</th></tr>'
                                                          '<tr><td>Qwen/Qwen2.5-Coder-0.5B-Instruct</td></tr></table>')
    assert html.index('id="extra"') < html.index('<h2 id="broken">') < html.index('id="notes"')
    assert "\n## Extra\n\n| run |\n|---|\n| Qwen/Qwen2.5-Coder-0.5B-Instruct |\n" in md
    assert "The broken section could not be rendered: ValueError(&#x27;boom&#x27;)" in html
    assert "The broken section could not be rendered: ValueError('boom')" in md


@pytest.mark.parametrize("with_base", [True, False])
def test_an_evaluate_model_run_has_its_own_header_in_both_pages(tmp_path, with_base):
    from refusal_directions.report import describe_intervention, evaluate_model_title, load_run
    from refusal_directions.report.sections import build_report

    write_fixture_run(tmp_path, stages="infer")
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    base = {"spec": "/models/base", "name": "base", "alias": "tiny", "fingerprint": "f0"} if with_base else None
    manifest["evaluate_model"] = {"model": {"spec": "/models/export", "name": "exp", "alias": "abl", "fingerprint": "f1"},
                                  "base": base}
    manifest_path.write_text(json.dumps(manifest))
    title = "Evaluate-model run: /models/export" + (" vs base /models/base" if with_base else " (no base)")
    assert evaluate_model_title(manifest["evaluate_model"]) == title
    page = build_report(load_run(tmp_path))
    md, html_text = render_markdown(page), render_html(page)
    assert page.title == title and md.startswith(f"# {title}\n") and f"<title>{title}</title>" in html_text
    assert "| run kind | evaluate-model |" in md and "| evaluated model | exp (alias abl, fingerprint f1) |" in md
    assert ("| base model | base (alias tiny" if with_base else "| base model | none given |") in md
    assert "| methods |" not in md and "| positions |" not in md and "n_train" not in md.split("\n\n")[1]
    assert "extract:" not in md and "select:" not in md  # the stages shown: infer and evaluate only
    assert describe_intervention({"kind": "model"}) == "the evaluated model's own weights (evaluate-model run)"


def test_the_judge_agreement_matrix_is_drawn_in_both_pages(tmp_path):
    from refusal_directions.report import load_run
    from refusal_directions.report.sections import build_report

    write_fixture_run(tmp_path)
    path = tmp_path / "evaluate" / "summary.json"
    summary = json.loads(path.read_text())
    summary["judge_agreement"] = {"jailbreakbench": {
        "judges": ["substring", "coherent", "rubric"],
        "labels": {"substring": "no refusal phrase", "coherent": "coherent success", "rubric": "score > 0"},
        "n_completions": 8, "n_judged": {"substring": 8, "coherent": 8, "rubric": 6},
        "positive_rate": {"substring": 0.5, "coherent": 0.25, "rubric": None},
        "pairs": [], "matrix": {"agreement": [[None, 0.75, 0.5], [0.75, None, 1.0], [0.5, 1.0, None]],
                                "kappa": [[None, 0.5, None], [0.5, None, 1.0], [None, 1.0, None]]},
        "disagreements": [{"intervention": "inlp.projection@all", "index": 3, "prompt": "how to pick a lock",
                           "text": "Sure.\nStep one", "truncated": False, "disagreement": 0.5,
                           "verdicts": {"substring": True, "coherent": False, "rubric": None}, "rubric": None}]}}
    path.write_text(json.dumps(summary))
    md = render_markdown(build_report(load_run(tmp_path)))
    section = md.split("## Judge agreement")[1]
    assert "### jailbreakbench (8 completions)" in section
    assert "| substring: no refusal phrase | 0.50 (n=8) | — | 0.75 | 0.50 |" in section  # agreement above the diagonal
    assert "| coherent: coherent success | 0.25 (n=8) | 0.50 | — | 1.00 |" in section  # kappa below
    assert "| rubric: score &gt; 0 | n/a (n=6) | n/a | 1.00 | — |" in section
    assert 'inlp.projection@all #3: substring yes, coherent no, rubric n/a. Prompt: how to pick a lock — "Sure. Step one"' in section
    assert "Judge agreement" in render_html(build_report(load_run(tmp_path)))
