"""The merge report (issue 16 §2, §4): report.json, the PNG figures and the self-contained HTML page agree with each
other and with the merge; spectra, per-layer means and unmatched modules are checked against direct recomputations;
the CLI reads a written output's stats from its metadata and follows the usual output rules."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lora_fusion import load_adapter, merge
from lora_fusion import report as report_module
from lora_fusion.diagnostics import interference_report
from lora_fusion.errors import InvalidParameterError, OutputExistsError, OutputProtectedError
from lora_fusion.report import (
    FIGURES,
    HTML_DIGITS,
    NO_LAYER,
    REPORT_FILES,
    build_report,
    layer_of,
    read_provenance,
    render_html,
    write_report,
)
from lora_fusion.runtime import thread_limit
from lora_fusion_cli.main import app
from tests.test_cli import assert_user_error
from tests.test_properties import write_lora

SHAPES = {f"model.layers.{i}.self_attn.{p}": (32, 24) for i in (0, 1, 10) for p in ("q_proj", "v_proj")}
SHAPES["model.lm_head"] = (40, 24)  # no layer index


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread (as the report itself uses), not OpenMP threads spinning on shared cores."""
    with thread_limit(1):
        yield


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


class Tables(HTMLParser):
    """Every <table id=…> of a page as rows of cell texts, and every <img src=…>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self._table = found["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(found["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Tables:
    tables = Tables()
    tables.feed(page)
    return tables


def same(cell: str, value: float) -> bool:
    """A page's number equals the JSON's to the page's stated precision."""
    return float(cell) == float(f"{value:.{HTML_DIGITS}g}")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    a = write_lora(root / "a", SHAPES, r=4, alpha=8, seed=1)
    b = write_lora(root / "b", SHAPES, r=4, alpha=4, seed=2)
    sources = [load_adapter(a), load_adapter(b)]
    merged = merge([a, b], method="svd", rank=3, weights=[0.6, 0.4])  # rank 3 of a rank-8 sum: truncated
    report = build_report(sources, merged)
    out = write_report(report, root / "report")
    return {"root": root, "paths": (a, b), "sources": sources, "merged": merged, "report": report, "out": out}


def test_the_folder_holds_the_report_files_and_decodable_figures(case) -> None:
    out = case["out"]
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    for name in FIGURES:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_report_json_matches_the_merge_stats_and_the_weights(case) -> None:
    saved = json.loads((case["out"] / "report.json").read_text())
    merged = case["merged"]
    assert list(saved["modules"]) == list(merged.modules)
    for name, stats in merged.stats.items():
        row = saved["modules"][name]
        assert (row["rank"], row["retained_energy"], row["relative_error"]) == (
            stats.rank, stats.retained_energy, stats.relative_error
        )
        assert row["weights"] == [0.6, 0.4] and row["layer"] == layer_of(name)[0]
    assert any(r["retained_energy"] < 1 for r in saved["modules"].values())  # the merge truncated
    assert saved["output"]["method"] == "svd" and saved["output"]["params"]["rank"] == 3
    assert str(case["root"]) not in json.dumps(saved)  # sources named without their absolute paths


def test_html_tables_equal_report_json_to_the_stated_precision(case) -> None:
    page = (case["out"] / "index.html").read_text()
    saved = json.loads((case["out"] / "report.json").read_text())
    tables = parse(page)
    header, *rows = tables.tables["modules"]
    assert header == ["module", "layer", "rank", "retained energy", "relative error", "effective weights"]
    assert [r[0] for r in rows] == list(saved["modules"])
    for name, layer, rank, energy, error, weights in rows:
        row = saved["modules"][name]
        assert layer == row["layer"] and int(rank) == row["rank"]
        assert same(energy, row["retained_energy"]) and same(error, row["relative_error"])
        assert [float(w) for w in weights.split(", ")] == row["weights"]
    header, *rows = tables.tables["layers"]
    layers = saved["interference"]["layers"]
    assert [r[0] for r in rows] == [x["layer"] for x in layers]
    assert [r[0] for r in rows] == ["model.layers.0", "model.layers.1", "model.layers.10", NO_LAYER]  # natural order
    for cells, layer in zip(rows, layers):
        assert int(cells[1]) == layer["modules"]
        pair = layer["pairs"]["0-1"]
        assert same(cells[2], pair["cosine"]) and same(cells[3], pair["subspace_overlap"])
        assert same(cells[4], layer["sign_conflict"])
    spectra = {(m, who): [float(v) for v in values.split(", ")] for m, who, values in tables.tables["spectra"][1:]}
    for item in saved["spectra"]:
        assert spectra[item["module"], "output"] == [float(f"{v:.{HTML_DIGITS}g}") for v in item["output"]]
    assert len(tables.images) == 3 and all(src.startswith("data:image/png;base64,") for src in tables.images)


def test_the_page_is_self_contained(case) -> None:
    page = (case["out"] / "index.html").read_text().lower()
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page


def test_spectra_equal_the_dense_singular_values(case) -> None:
    report, merged, sources = case["report"], case["merged"], case["sources"]
    assert len(report["spectra"]) == 6
    norms = [item["norm"] for item in report["spectra"]]
    assert norms == sorted(norms, reverse=True)
    expected_norms = sorted((float(merged.delta(m).double().norm()) for m in merged.modules), reverse=True)[:6]
    assert norms == pytest.approx(expected_norms, rel=1e-6)
    for item in report["spectra"]:
        dense = [merged.delta(item["module"])] + [s.delta(item["module"]) for s in sources]
        for got, matrix in zip([item["output"], *item["sources"]], dense):
            want = torch.linalg.svdvals(matrix.double())[: len(got)]
            assert len(got) == min(4 if got is not item["output"] else 3, *matrix.shape)
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-5, atol=1e-5)


def test_per_layer_means_equal_a_recomputation_from_interference_report(case) -> None:
    direct = interference_report(case["sources"], density=0.2)
    part = case["report"]["interference"]
    assert part["unmatched"] == direct["unmatched"] == {}
    groups: dict[str, list[dict]] = {}
    for module, stats in direct["modules"].items():
        groups.setdefault(layer_of(module)[0], []).append(stats)
        mine = part["modules"][module]
        assert mine["sign_conflict"] == stats["sign_conflict"] and mine["sign_conflict_sampled"] is None
        # float32 m×r work (report.py), float64 in diagnostics: equal to ~1e-6, well inside the page's 6 digits
        assert mine["pairs"]["0-1"] == pytest.approx(stats["pairs"]["0-1"], rel=1e-5, abs=1e-6)
    assert {row["layer"] for row in part["layers"]} == set(groups)
    for row in part["layers"]:
        members = groups[row["layer"]]
        assert row["modules"] == len(members)
        assert row["sign_conflict"] == pytest.approx(sum(m["sign_conflict"] for m in members) / len(members), abs=1e-15)
        for stat in ("cosine", "subspace_overlap"):
            mean = sum(m["pairs"]["0-1"][stat] for m in members) / len(members)
            assert row["pairs"]["0-1"][stat] == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert part["overall"]["sign_conflict"] == pytest.approx(direct["overall"]["sign_conflict"], abs=1e-15)


def test_ties_merge_and_per_module_weights(case) -> None:
    merged = merge(list(case["paths"]), method="ties", density=0.5, rank=4, weights=[1.0, 0.5])
    merged.provenance["module_weights"] = {"model.lm_head": [0.25, 0.75]}  # per-module weights, as recorded
    report = build_report(case["sources"], merged, spectra=2)
    for name, stats in merged.stats.items():
        row = report["modules"][name]
        assert (row["rank"], row["retained_energy"], row["relative_error"]) == (
            stats.rank, stats.retained_energy, stats.relative_error
        )
        assert row["weights"] == ([0.25, 0.75] if name == "model.lm_head" else [1.0, 0.5])
    assert report["output"]["method"] == "ties" and len(report["spectra"]) == 2


def test_sources_with_partly_different_modules_are_compared_where_they_can_be(case, tmp_path) -> None:
    shapes = dict(SHAPES)
    shapes["model.layers.0.self_attn.q_proj"] = (48, 24)  # another shape
    shapes["model.layers.2.mlp.up_proj"] = (32, 24)  # a module the others lack
    del shapes["model.lm_head"]  # and one it lacks
    other = load_adapter(write_lora(tmp_path / "c", shapes, r=4, alpha=8, seed=3))
    report = build_report([case["sources"][0], other])
    unmatched = report["interference"]["unmatched"]
    assert unmatched == interference_report([case["sources"][0], other])["unmatched"]
    assert set(unmatched) == {"model.layers.0.self_attn.q_proj", "model.layers.2.mlp.up_proj", "model.lm_head"}
    assert unmatched["model.layers.0.self_attn.q_proj"].startswith("shapes differ")
    assert unmatched["model.lm_head"] == "only in [0]" and unmatched["model.layers.2.mlp.up_proj"] == "only in [1]"
    assert "model.layers.0.self_attn.q_proj" not in report["interference"]["modules"]
    assert report["modules"] == {} and report["output"] is None
    assert report["spectra"][0]["sources"][1] is not None or report["spectra"][0]["module"] == "model.lm_head"
    tables = parse(render_html(report, {name: b"" for name in FIGURES})).tables
    assert {row[0]: row[1] for row in tables["unmatched"][1:]} == unmatched


def test_large_modules_get_a_stated_sampled_estimate(case, monkeypatch) -> None:
    monkeypatch.setattr(report_module, "EXACT_SIGN_ENTRIES", 100)  # every test module counts as large
    report = build_report(case["sources"], sign_sample=20_000)
    direct = interference_report(case["sources"], density=0.2)["modules"]
    modules = report["interference"]["modules"]
    assert all(m["sign_conflict_sampled"] == 20_000 for m in modules.values())
    for name, stats in direct.items():
        assert modules[name]["sign_conflict"] == pytest.approx(stats["sign_conflict"], abs=0.03)
    counting = report["interference"]["sign_conflict_counting"]
    assert counting["sampled_modules"] == len(modules) and counting["exact_modules"] == 0
    assert any("estimates from 20,000 random entries" in note for note in report["notes"])
    assert "estimates from 20,000 random entries" in render_html(report, {name: b"" for name in FIGURES})


def test_names_are_escaped_in_the_page(case) -> None:
    report = json.loads(json.dumps(case["report"]))
    report["sources"][0]["name"] = '<img src="http://x">&'
    module = next(iter(report["modules"]))
    report["modules"]['<script>alert(1)</script>'] = report["modules"].pop(module)
    page = render_html(report, {name: b"png" for name in FIGURES})
    assert "<script>" not in page and '<img src="http' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=&quot;http://x&quot;&gt;&amp;" in page


def test_write_refuses_existing_folders_unless_they_hold_only_a_report(case, tmp_path) -> None:
    out = tmp_path / "report"
    shutil.copytree(case["out"], out)  # a report folder, as write_report left it
    with pytest.raises(OutputExistsError):
        write_report(case["report"], out)
    assert write_report(case["report"], out, overwrite=True) == out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputProtectedError, match="notes.txt"):
        write_report(case["report"], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(InvalidParameterError):
        build_report(case["sources"][:1])


def test_read_provenance_of_a_written_output(case, tmp_path) -> None:
    written = load_adapter(case["merged"].save_pretrained(tmp_path / "merged"))
    record = read_provenance(written)
    assert record["method"] == "svd" and [s["weight"] for s in record["sources"]] == [0.6, 0.4]
    assert read_provenance(case["sources"][0]) is None
    report = build_report(case["sources"], written)  # no .stats: read from the metadata
    for name, stats in case["merged"].stats.items():
        row = report["modules"][name]
        assert row["rank"] == stats.rank
        assert row["retained_energy"] == round(stats.retained_energy, 8)
        assert row["relative_error"] == round(stats.relative_error, 8)


def test_cli_writes_the_report_of_a_written_output_and_its_sources(case, tmp_path) -> None:
    merged_dir = case["merged"].save_pretrained(tmp_path / "merged")
    a, b = case["paths"]
    out = tmp_path / "cli-report"
    result = invoke("report", merged_dir, a, b, "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    saved = json.loads((out / "report.json").read_text())
    assert saved["output"]["method"] == "svd" and [s["name"] for s in saved["sources"]] == [str(a.name), str(b.name)]
    assert {n: r["rank"] for n, r in saved["modules"].items()} == {n: s.rank for n, s in case["merged"].stats.items()}
    assert_user_error(invoke("report", merged_dir, a, b, "--out", out), "already exists", "--overwrite")
    assert invoke("report", merged_dir, a, b, "--out", out, "--overwrite").exit_code == 0
    alone = invoke("report", merged_dir, "--out", tmp_path / "alone")  # an output alone: its stats and spectra
    assert alone.exit_code == 0, alone.output
    saved = json.loads((tmp_path / "alone" / "report.json").read_text())
    assert saved["sources"] == [] and saved["interference"]["layers"] == [] and len(saved["modules"]) == 7
    assert_user_error(invoke("report", a, "--out", tmp_path / "one"), "not a merge output")
    assert_user_error(invoke("report", merged_dir, merged_dir, a, "--out", tmp_path / "two"), "are both merged outputs")
    assert_user_error(invoke("report", merged_dir, a, b, "--out", a, "--overwrite"), "it is the input")
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()


def test_merge_with_report_writes_the_report_of_that_merge(tmp_path) -> None:
    """`merge --report DIR`: the report's per-module numbers are the written merge's stats."""
    from lora_fusion import load_adapter as open_adapter
    from tests.test_cli import invoke as run_cli
    from tests.test_reliability import lora as small_lora

    a, b = small_lora(tmp_path / "a", seed=1), small_lora(tmp_path / "b", seed=2)
    result = run_cli("merge", a, b, "--method", "svd", "--rank", "2", "--out", tmp_path / "m",
                     "--report", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "rep" / "report.json").read_text())
    merged = open_adapter(tmp_path / "m")
    assert set(record["modules"]) == set(merged.modules)
    assert all(row["rank"] == 2 for row in record["modules"].values())
