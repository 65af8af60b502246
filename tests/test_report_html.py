"""report.html: every run writes one self-contained page (curves, eval table, pass@k and diversity, dark knowledge,
export); what a run directory lacks is said on the page; in headless Chromium it renders (skipped without
chromium). The dark-knowledge section's own numbers: tests/test_dark_knowledge_report.py."""

import base64
import io
import json
import re
import shutil
import subprocess

import pytest

from distil.cli import main
from distil.report_html import write_page

IMG = re.compile(r'<img alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def _images(page):
    import matplotlib.image

    found = IMG.findall(page)
    for b64 in found:
        raw = base64.b64decode(b64, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(io.BytesIO(raw), format="png").std() > 0  # decodes and is not blank
    return len(found)


def _offline(page):
    # nothing fetched from elsewhere: no script, no external src/href, no @import
    assert "<script" not in page and "@import" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_a_run_writes_the_page_with_every_section(make_recipe):
    path = make_recipe(eval={"enabled": True, "hard_label_baseline": True, "task": "sum3", "task_size": 2,
                             "samples": 3, "max_new_tokens": 4, "diversity_warn": 1.0})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    page = (run / "report.html").read_text()
    _offline(page)
    for heading in ("<h1>t</h1>", "<h2>Training</h2>", "<h3>main phase", "<h3>hard_labels", "<h2>Evaluation</h2>",
                    "<h3>Task sum3 (2 eval questions, 3 sample(s) each)</h3>"):
        assert heading in page, heading
    # 2 training figures (offline, hard_labels) + the pass@k / diversity figure + the dark-knowledge figure
    assert _images(page) == 4 and '<h2 id="dark-knowledge">Dark knowledge</h2>' in page
    record = json.loads((run / "eval.json").read_text())
    for row, m in record["results"].items():
        assert f"<td>{row}</td>" in page and f"<td>{m['ppl']:.4g}</td>" in page
    for w in record["generation"]["task"]["warnings"]:
        assert w.replace("'", "&#x27;") in page
    (run / "report.html").unlink()  # `distil eval RUN_DIR` refreshes the record, and the page with it
    assert main(["eval", str(run)]) == 0
    assert "<h2>Evaluation</h2>" in (run / "report.html").read_text()


def test_a_run_directory_without_metrics_or_eval_says_so(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: x\nexport: {enabled: true}\n")
    page = write_page(tmp_path).read_text()
    assert "No metrics.jsonl in this run directory" in page and "No eval.json in this run directory" in page
    assert "no GGUF file was found" in page and _images(page) == 0
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "kd": 2.0, "lr": 0.1, "grad_norm": 1.5}\n'
                                            "not json\n"
                                            '{"step": 2, "loss": 1.5, "kd": 1.5, "lr": 0.05, "grad_norm": null}\n')
    (tmp_path / "eval.json").write_text("[1, 2]")  # not a record
    page = write_page(tmp_path).read_text()
    assert "1 line(s) of metrics.jsonl are not metric rows" in page and _images(page) == 1
    assert "No eval.json" in page
    (tmp_path / "bare").mkdir()
    assert "No readable recipe.yaml" in write_page(tmp_path / "bare").read_text()


def test_the_summary_names_the_objective_the_method_trains_with(tmp_path):
    """As the run header: a method whose own section holds the loss is shown by that key, not by distill.loss."""
    (tmp_path / "recipe.yaml").write_text("name: x\ndistill: {method: onpolicy, loss: forward_kl}\n"
                                          "onpolicy: {loss: reverse_kl}\n")
    assert "loss <code>onpolicy.loss=reverse_kl</code>" in write_page(tmp_path).read_text()
    (tmp_path / "recipe.yaml").write_text("name: x\ndistill: {method: offline, loss: jsd}\n")
    assert "loss <code>jsd</code>" in write_page(tmp_path).read_text()
    (tmp_path / "recipe.yaml").write_text("name: x\ndistill: {method: onpolicy}\nonpolicy: [1]\n")  # malformed
    assert "loss <code>onpolicy.loss=?</code>" in write_page(tmp_path).read_text()


def test_export_section_lists_the_gguf(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: x\nexport: {enabled: true, quant: Q4_K_M, prompt: hi}\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "x-Q4_K_M.gguf").write_bytes(b"\0" * 2_500_000)
    (tmp_path / "export" / "x-Q4_K_M.Modelfile").write_text("FROM ./x-Q4_K_M.gguf\n")
    page = write_page(tmp_path).read_text()
    assert "<td>x-Q4_K_M.gguf</td><td>Q4_K_M</td><td>2.5</td>" in page and "FROM ./x-Q4_K_M.gguf" in page


def _chromium(uri, *args):
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *args, uri], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium): no headless rendering")
def test_headless_chromium_renders_it(make_recipe, tmp_path):
    """As a person would look at it: the page (and its dark-knowledge section alone) rendered in headless Chromium,
    screenshots not blank, no console message at all (an error, a refused resource, a script)."""
    import matplotlib.image

    path = make_recipe(eval={"enabled": True})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    page = run / "report.html"
    assert (run / "dark_knowledge.json").is_file()
    shot = tmp_path / "shot.png"
    proc = _chromium(page.as_uri(), "--window-size=1200,1600", f"--screenshot={shot}")
    assert shot.is_file(), proc.stderr[-2000:]
    assert matplotlib.image.imread(str(shot)).std() > 0.01  # not blank
    assert not re.search(r"CONSOLE[:(]", proc.stderr), proc.stderr[-2000:]  # no console errors
    # the browser's DOM holds the dark-knowledge section: its heading, a table per position (4 by default), and its
    # figure (the 2nd image: the training curves come first) decoded by the browser (naturalWidth is not in the DOM;
    # the screenshot below shows it)
    dom = _chromium(page.as_uri(), "--dump-dom").stdout
    section = dom.split('<h2 id="dark-knowledge">Dark knowledge</h2>')[1]
    assert section.count("<h3>position ") == 4 and section.count('<img alt="plot"') == 1
    # the section alone (recipe.yaml + dark_knowledge.json): it fills the screenshot below the two missing lines
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("recipe.yaml", "dark_knowledge.json"):
        (alone / name).write_bytes((run / name).read_bytes())
    shot2 = tmp_path / "dk.png"
    proc = _chromium(write_page(alone).as_uri(), "--window-size=1200,1600", f"--screenshot={shot2}")
    assert shot2.is_file() and not re.search(r"CONSOLE[:(]", proc.stderr), proc.stderr[-2000:]
    pixels = matplotlib.image.imread(str(shot2))
    assert pixels[400:1000].std() > 0.05  # the figure and the first tables, drawn (not a blank band)
    assert (pixels[400:1000, :, :3] < 0.5).mean() > 0.005  # with ink on it


def test_the_export_stage_records_llamacpp_answer_and_the_page_shows_it(make_recipe):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the [llamacpp] extra)")
    path = make_recipe(export={"enabled": True, "quant": "F32", "prompt": "hi", "max_tokens": 4})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    record = json.loads((run / "export" / "answer.json").read_text())
    assert record["prompt"] == "hi" and list(record["answers"]) == ["F32 student"]
    page = (run / "report.html").read_text()
    assert "llama.cpp&gt; <code>hi</code>" in page and "<td>F32 student</td>" in page
    (run / "export" / "answer.json").unlink()  # a run made before answers were recorded
    assert "No readable export/answer.json" in write_page(run).read_text()
