from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bs4 import BeautifulSoup

from condconv_bench.report import write_report
from conftest import CPP_COMPILER_MISSING
from condconv_bench.run.directory import RunDirectory, load_results
from condconv_bench.report.runs import cross_run, load_runs
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter

DATA = Path(__file__).parent / "data"
TINY = DATA / "valid" / "tiny.yaml"
MARKUP_NAME = '<script>alert("x")</script> & <b>tiny</b>'


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A profiled run of a suite whose name is markup, and a second run with 2 threads."""
    base = tmp_path_factory.mktemp("report")
    data = yaml.safe_load(TINY.read_text())
    data["name"] = MARKUP_NAME
    data["impls"] = ["static", "grouped_conv", "batched_matmul", "compiled"]
    suite = base / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    one = base / "one-thread"
    run_suite(suite, one, case_filter=CaseFilter(devices=("cpu",)), profile=True)
    data["threads"] = [2]
    data["impls"] = ["static", "grouped_conv", "batched_matmul"]
    two_suite = base / "suite2.yaml"
    two_suite.write_text(yaml.safe_dump(data))
    two = base / "two-threads"
    run_suite(two_suite, two, case_filter=CaseFilter(devices=("cpu",)))
    return {"one": one, "two": two, "base": base}


@pytest.fixture(scope="module")
def single(runs) -> Path:
    return write_report([runs["one"]], runs["base"] / "single.html")


@pytest.fixture(scope="module")
def compared(runs) -> Path:
    return write_report([runs["one"], runs["two"]], runs["base"] / "compare.html")


def soup_of(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def section_titles(soup: BeautifulSoup) -> list[str]:
    return [h.get_text(" ", strip=True) for h in soup.find_all("h3")]


def test_report_has_every_section_and_is_self_contained(runs, single) -> None:
    soup = soup_of(single)
    titles = section_titles(soup)
    for expected in ("Headline", "Plots", "FLOPs", "Equivalence", "Unstable", "Skipped and errored", "Compile times", "Profiles", "Environment"):
        assert any(t.startswith(expected) for t in titles), (expected, titles)
    images = soup.find_all("img")
    # Inference: latency, speed, memory, achieved GFLOP/s, roofline, phases; training (the fc layer)
    # has no forward-only figures (achieved GFLOP/s, roofline), and its phases include the backward.
    titles_of = [image["alt"].split(" (")[0] for image in images]
    assert len(images) == 6 + 4, titles_of
    assert sum(t.startswith("Roofline") for t in titles_of) == 1 and sum(t.startswith("Phases") for t in titles_of) == 2
    for image in images:
        src = image["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    external = [tag for tag in soup.find_all(["script", "link", "iframe"])]
    assert external == []
    for tag in soup.find_all(href=True):
        assert not tag["href"].startswith(("http:", "https:", "//"))
    for png in (runs["base"] / "plots").glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
    assert len(list((runs["base"] / "plots").glob("*.png"))) >= 4


def test_suite_name_with_markup_is_escaped(single) -> None:
    text = single.read_text(encoding="utf-8")
    assert '<script>alert("x")</script>' not in text
    soup = soup_of(single)
    assert soup.find("script") is None and soup.find("b") is None
    assert MARKUP_NAME in soup.find("h1").get_text()


def test_headline_names_the_fastest_and_ratios(single) -> None:
    table = soup_of(single).find("h3", string=lambda s: s and s.startswith("Headline")).find_next("table")
    header = [th.get_text(strip=True) for th in table.find("tr").find_all("th")]
    assert header[-5:] == ["fastest", "latency", "vs floor", "vs limit", "vs grouped_conv"]
    rows = [tr for tr in table.find_all("tr")[1:] if "summary" not in (tr.get("class") or [])]
    cells = [[td.get_text(strip=True) for td in row.find_all("td")] for row in rows]
    assert len(rows) == 2 * 2 + 2 * 2, cells  # pw, dw3 × 2 batch sizes; fc × 2 batch sizes × 2 modes
    for row in cells:
        assert {name.strip() for name in row[-5].split("(")[0].split("≈")} <= {"grouped_conv", "batched_matmul", "compiled"}, row
        assert re.fullmatch(r"\d+\.\d\d× \[\d+\.\d\d–\d+\.\d\d\]", row[-3]), row  # ratio [95% CI]
        assert row[-1].endswith("×"), row
    summaries = table.find_all("tr", class_="summary")
    ran = {"static", "grouped_conv", "batched_matmul"} | ({"compiled"} if CPP_COMPILER_MISSING is None else set())  # compiled needs a C++ compiler
    assert {s.get_text().split(":")[1].split("(")[0].strip() for s in summaries} == ran


def test_two_runs_compare_side_by_side(runs, compared) -> None:
    comparison, variants = cross_run(load_runs([runs["one"], runs["two"]]))
    assert len(variants) == 2 and "1 thr" not in variants[0]
    assert set(comparison["impl"]) == {"static", "grouped_conv", "batched_matmul"}
    assert (comparison[f"ratio:{variants[1]}"] > 0).all()
    soup = soup_of(compared)
    section = soup.find(id="comparison")
    assert section is not None
    text = section.get_text(" ")
    assert "one-thread" in text and "two-threads" in text
    assert len(soup.find_all("section", class_="run")) == 2


def test_markdown_and_csv_formats(runs) -> None:
    markdown = write_report([runs["one"], runs["two"]], None, "markdown")
    assert "| layer |" in markdown and "vs floor" in markdown
    assert "## Side by side" in markdown
    csv_text = write_report([runs["one"], runs["two"]], None, "csv")
    header = csv_text.splitlines()[0].split(",")
    assert header[0] == "case_id" and header[-1] == "run"
    assert len(csv_text.splitlines()) == 1 + len(load_results(runs["one"])) + len(load_results(runs["two"]))


def test_profiles_are_listed_and_load_in_the_tensorboard_plugin(runs, single) -> None:
    traces = runs["one"] / "traces"
    files = sorted(traces.glob("*.pt.trace.json"))
    assert files
    soup = soup_of(single)
    profiles = soup.find("h3", string="Profiles").find_all_next("details")
    assert len(files) == len([d for d in profiles if d.find("a", href=lambda h: h and h.endswith(".pt.trace.json"))])
    first_table = profiles[0].find("table")
    assert len(first_table.find_all("tr")) > 2 and "aten::" in first_table.get_text()
    # The plugin parses each trace in a spawned process, so load it from a script, as TensorBoard does.
    script = (
        "import sys\n"
        "from torch_tb_profiler import io\n"
        "from torch_tb_profiler.profiler.loader import RunLoader\n"
        "if __name__ == '__main__':\n"
        "    run = RunLoader('t', sys.argv[1], io.Cache()).load()\n"
        "    views = {v.name for p in run.profiles.values() for v in p.views}\n"
        "    print(len(run.workers), sorted(views))\n"
    )
    loader = runs["base"] / "load_traces.py"
    loader.write_text(script)
    result = subprocess.run([sys.executable, str(loader), str(traces)], capture_output=True, text=True, timeout=300)
    workers, views = result.stdout.strip().split(" ", 1)
    assert int(workers) == len(files)
    assert "operator" in views and "trace" in views and "memory" in views


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_fits_1280_pixels_in_a_real_browser(runs, compared) -> None:
    output = compared
    probe = output.with_name("probe.html")
    check = (
        "<script>window.addEventListener('load', () => {"
        "const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;"
        "document.title = 'probe ' + document.documentElement.scrollWidth + ' ' + broken + ' ' + document.images.length; });</script>"
    )
    probe.write_text(output.read_text(encoding="utf-8").replace("</body>", check + "</body>"), encoding="utf-8")
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={runs['base'] / 'chromium'}",
         "--window-size=1280,900", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    title = BeautifulSoup(result.stdout, "html.parser").find("title").get_text()
    _, width, broken, images = title.split()
    # profiled run: 6 inference + 4 training figures; the other: no phase bars (5 + 3)
    assert int(width) <= 1280 and int(broken) == 0 and int(images) == 18


def test_headline_shows_the_distance_to_the_limit(single) -> None:
    soup = soup_of(single)
    table = soup.find("h3", string=lambda t: t and t.startswith("Headline")).find_next("table")
    header = [th.get_text(strip=True) for th in table.find("tr").find_all("th")]
    assert header.index("vs limit") == header.index("vs floor") + 1
    limit_cells = [row.find_all("td")[header.index("vs limit")].get_text(" ", strip=True) for row in table.find_all("tr")[1:]
                   if "summary" not in (row.get("class") or [])]
    inference = [cell for cell in limit_cells if cell != "-"]
    assert inference and all(cell.endswith(("llc", "dram")) and float(cell.split("×")[0]) > 0.9 for cell in inference)
    summary = [row.get_text(" ", strip=True) for row in table.find_all("tr", class_="summary")]
    assert all("own)" in row for row in summary)
    assert soup.find("h3", string="Limits") is not None
    environment = soup.find("h3", string="Environment").find_next("dl").get_text(" ", strip=True)
    assert "dense peak" in environment and "depthwise-conv peak" in environment and "DRAM" in environment


def test_damaged_phases_cost_only_their_record(runs, tmp_path) -> None:
    import warnings

    copy = tmp_path / "damaged"
    shutil.copytree(runs["one"], copy)
    lines = (copy / "profiles.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["phases_us"] = {"product": "lots"}
    (copy / "profiles.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiles = RunDirectory(copy).profiles()
    assert len(profiles) == len(lines) and "phases_us" not in profiles[0] and "phases_us" in profiles[1]
    assert any("line 1 phases set aside" in str(w.message) for w in caught)


def test_an_empty_headline_says_why() -> None:
    import pandas as pd

    from condconv_bench.report import tables

    floor_and_autotune = pd.DataFrame({"impl": ["static", "autotune"], "role": ["floor", "dispatcher"],
                                       "status": ["ok", "ok"], "equivalent": [True, True]})
    assert tables.headline_absent(floor_and_autotune).startswith("No strategy ran beside the floor and autotune")
    failed = floor_and_autotune.assign(impl=["static", "grouped_conv"], role=["floor", "strategy"], equivalent=[True, False])
    assert tables.headline_absent(failed) == "No implementation produced a verified latency."
