"""report.html: one self-contained page, checked in a real browser (headless Chromium).

The browser test loads a copy of the page with a probe script appended: it records every console message and
uncaught error, the resources the page fetched (it must fetch none: everything is inline), the images that did
not decode, the number of sample cells, and the column order after two clicks on a table header; headless
Chromium's ``--dump-dom`` prints the DOM with the probe's JSON in it. ``--enable-logging=stderr --v=0`` also
puts the page's console lines on stderr, which must hold none. A screenshot of the page is saved beside it
(``report_screenshot.png``). Skipped only when no Chromium is installed (``.ci/run`` installs Debian's).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
from _eval_stubs import FakeClip, FakeEditor, FakePipeline, FakeRareWordEditor, registered
from PIL import Image

from editbench.eval import html as H
from editbench.eval import report as R
from editbench.eval import runner
from editbench.eval import spec as suite_spec


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _chromium()
BROWSER = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]

PROBE = """
<script>
(function(){
  var log = [];
  ['error', 'warn', 'log', 'info'].forEach(function(k){
    var f = console[k]; console[k] = function(){ log.push(k + ': ' + Array.prototype.join.call(arguments, ' '));
                                                f.apply(console, arguments); };
  });
  window.addEventListener('error', function(e){ log.push('uncaught: ' + e.message); });
  function column(table, i){
    return Array.prototype.map.call(table.tBodies[0].rows, function(r){ return r.cells[i].getAttribute('data-v'); });
  }
  window.addEventListener('load', function(){
    var table = document.querySelector('table.results'), heads = table.querySelectorAll('th'), col = -1;
    heads.forEach(function(h, i){ if (h.textContent === 'image alignment') col = i; });
    heads[col].click(); var asc = column(table, col);
    heads[col].click(); var desc = column(table, col);
    var broken = Array.prototype.filter.call(document.images, function(im){
      return !(im.complete && im.naturalWidth > 0); }).length;
    var out = {console: log, broken: broken, images: document.images.length,
               samples: document.querySelectorAll('figure.sample').length,
               resources: performance.getEntriesByType('resource').map(function(r){ return r.name; }),
               asc: asc, desc: desc};
    var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
</script>
"""


class _Fake(FakeEditor):
    def check_pipeline(self, pipeline):  # the fake pipeline has no UNet: nothing to check
        pass


class _FakeSingle(FakeRareWordEditor):
    def check_pipeline(self, pipeline):
        pass


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "out"
    spec = {"name": "html", "model": "tiny", "concepts": ["zebra", "sunny"], "pairs": [["zebra", "sunny"]],
            "seeds": [0, 1], "max_prompts": 2, "images_per_prompt": 2,
            "methods": ["base", {"name": "fake", "label": "perfusion-like", "sweep": {"scale": [0.2, 1.0]}},
                        "fake_single"]}
    with registered(_Fake, _FakeSingle):
        runner.run_suite(suite_spec.load_suite(spec), out, pipeline=FakePipeline(), clip=FakeClip(), progress=False)
    R.write_report(out)
    return out


def _expected_samples(out) -> tuple[int, int]:
    """(single-concept, pair) sample cells: every image of the first seed."""
    df = pd.read_csv(out / "results.csv")
    first = df[df["seed"] == df["seed"].min()]
    return int((first["n_concepts"] == 1).sum()), int((first["n_concepts"] > 1).sum())


def test_report_html_is_self_contained(results):
    page = (results / "report.html").read_text()
    single, pair = _expected_samples(results)
    # 2 concepts x 2 prompts x (base + 2 settings + fake_single) x 2 images; the pair: (base + 2 settings) x 2 x 2
    assert (single, pair) == (2 * 2 * 4 * 2, 1 * 2 * 3 * 2)
    assert page.count(f"<figure class='{H.IMAGE_CELL_CLASS}'>") == single + pair
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:|#)""", page)  # nothing but data: URIs and anchors
    assert "<link" not in page and "@import" not in page and "http://" not in page and "https://" not in page
    for needle in ("Single concept", "Multi-concept composition", "perfusion-like", "scale=0.2", "fake_single",
                   "Skipped cells", "Pair samples", "alignment", "storage", "training_time", "<script>"):
        assert needle in page, needle
    plots = list((results / "plots").glob("*.png")) + list((results / "grids").glob("clip_vs_ground_truth.png"))
    assert {p.stem for p in plots} >= {"alignment", "oracle", "storage", "training_time", "clip_vs_ground_truth"}
    assert page.count("data:image/png;base64,") == single + pair + len(plots)
    rows = H.sample_rows(pd.read_csv(results / "results.csv"), 1)
    assert len(rows) == 4 and all(g["label"].nunique() == 3 for _, g in rows)  # base, perfusion-like, fake_single


def test_report_html_caps_the_embedded_images(results, tmp_path):
    out = tmp_path / "capped"
    shutil.copytree(results, out)
    df = R.collect(out)
    R.write_report(out)  # the default cap holds everything here
    single, pair = _expected_samples(out)
    assert (out / "report.html").read_text().count("figure class='sample'") == single + pair
    path = H.write_html(out, df, R.summary_table(df), R.composition_table(df), title="t", intro="i",
                        single_cols=[("text_alignment", "text alignment")], pair_cols=[], plots=[], notes=[],
                        max_images=20)
    page = path.read_text()
    assert 0 < page.count("figure class='sample'") <= 20 and "more prompts are not shown" in page


def test_report_html_thumbnails_large_images(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (512, 384), "red").save(big)
    uri = H._png_uri(big, H.THUMB_PX)
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.format == "PNG" and im.size == (128, 96)
    assert H._png_uri(tmp_path / "missing.png") is None


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install -y chromium; .ci/run does it)")
def test_report_html_in_headless_chromium(results, tmp_path):
    page = (results / "report.html").read_text()
    probe = tmp_path / "probed.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    run = subprocess.run([CHROMIUM, *BROWSER, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stdout[-2000:]
    got = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert got["console"] == [] and console == [], (got["console"], console)
    assert got["resources"] == []                      # nothing fetched: every image and script is inline
    assert got["broken"] == 0 and got["images"] >= got["samples"]
    single, pair = _expected_samples(results)
    assert got["samples"] == single + pair
    # clicking the header sorts the column: ascending, then descending
    asc, desc = [float(v) for v in got["asc"]], [float(v) for v in got["desc"]]
    assert asc == sorted(asc) and desc == sorted(asc, reverse=True) and len(asc) == 4
    shot = results / "report_screenshot.png"
    shoot = subprocess.run([CHROMIUM, *BROWSER, "--window-size=1280,1600", f"--screenshot={shot}",
                            (results / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shoot.returncode == 0 and shot.is_file(), shoot.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        assert len(im.convert("L").getcolors(1 << 16) or []) > 16  # drawn, not a blank page
