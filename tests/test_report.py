"""``mimi-tokenize report`` on a real pipeline output (real audio, a corrupt and an empty file, a tiny model on a
local Ray instance): the text summary, the code statistics against an independent numpy computation, and the HTML
page rendered in a real headless browser (Debian's ``chromium``; CI must ``apt-get install chromium``)."""

from __future__ import annotations

import base64
import copy
import html
import io
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from audio_fixtures import corrupt_bytes, write_audio
from pipeline import manifest, report
from pipeline.cli import main
from pipeline.writer import read_codes

K = 8
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_model_path) -> str:
    """A finished output: 5 good clips in several shards, plus a corrupt and an empty file (2 failures)."""
    root = tmp_path_factory.mktemp("corpus")
    specs = [("wav_pcm16", 16_000, 0.9, 1), ("flac", 44_100, 1.3, 2), ("wav_float", 24_000, 2.5, 1),
             ("mp3", 22_050, 0.7, 1), ("flac", 8_000, 1.8, 1)]
    for i, (fmt, sr, seconds, channels) in enumerate(specs):
        ext = "mp3" if fmt == "mp3" else "flac" if fmt == "flac" else "wav"
        write_audio(root / f"clip{i:02d}.{ext}", fmt, sr, seconds, channels, seed=i)
    (root / "corrupt.wav").write_bytes(corrupt_bytes())
    (root / "empty.flac").write_bytes(b"")
    model = tiny_model_path
    out = str(tmp_path_factory.mktemp("out") / "out")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert main(["run", "--input", str(root), "--output", out, "--model", str(model), "--device", "cpu",
                     "--num-codebooks", str(K), "--files-per-shard", "3", "--max-failure-share", "0.5"]) == 0
    finally:
        ray.shutdown()
    return out


@pytest.fixture(scope="module")
def independent(output) -> dict[int, dict[str, float]]:
    """Per level: used codes, entropy and perplexity from codes read back row by row with pyarrow + np.unique."""
    codes = []
    for file in sorted(Path(output, "data").glob("*.parquet")):
        table = pq.read_table(file)
        codes += [read_codes(table, i) for i in range(table.num_rows)]
    stacked = np.concatenate(codes)  # [frames, K]
    stats = {}
    for level in range(K):
        values, counts = np.unique(stacked[:, level], return_counts=True)
        p = counts / counts.sum()
        entropy = -sum(float(q) * math.log2(float(q)) for q in p)
        counts_2048 = np.zeros(2048, np.int64)
        counts_2048[values] = counts
        stats[level] = {"used": len(values), "entropy": entropy, "perplexity": 2 ** entropy,
                        "counts": counts_2048, "frames": len(stacked)}
    return stats


def test_text_report(output, independent, capsys):
    m = manifest.read_manifest(output)
    assert (m["totals"]["clips"], m["totals"]["failed_clips"]) == (5, 2)
    assert main(["report", output]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"audio hours +{re.escape(report.fmt_hours(m['totals']['hours']))}\n", text)
    assert re.search(r"clips +5\n", text) and re.search(r"failed clips +2 \(28\.57%\)\n", text)
    assert "DecodeError: 1" in text and "ValueError: 1" in text
    assert "corrupt.wav [decode]" in text and "empty.flac [read]" in text
    for level, s in independent.items():
        assert f"level {level:>2}: used {s['used']:>5}  entropy {report.fmt_bits(s['entropy']):>6}" in text
    assert f"sha256 {m['model']['sha256']}" in text


def test_report_of_missing_output(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_code_statistics_match_numpy(output, independent):
    data = report.collect(output)
    m = data.manifest
    assert (data.parquet_rows, data.parquet_frames) == (m["totals"]["clips"], m["totals"]["frames"])
    assert data.durations.sum() / 3600 == pytest.approx(m["totals"]["hours"], rel=1e-12)
    assert len(data.levels) == K
    for s in data.levels:
        ref = independent[s.level]
        np.testing.assert_array_equal(s.counts, ref["counts"])
        assert s.total == ref["frames"] == m["totals"]["frames"]
        assert s.used == ref["used"]
        assert s.entropy_bits == pytest.approx(ref["entropy"], abs=1e-9)
        assert s.perplexity == pytest.approx(ref["perplexity"], rel=1e-9)
    # throughput: cumulative hours over the done records' timestamps ends at the total
    assert data.throughput[0] == (0.0, 0.0) and data.throughput[-1][1] == pytest.approx(m["totals"]["hours"])
    assert {c: len(v) for c, v in data.failures_by_class.items()} == {"DecodeError": 1, "ValueError": 1}


def test_level_flags():
    uniform = report.level_stats(0, np.full(2048, 10))
    assert uniform.entropy_bits == pytest.approx(11) and uniform.perplexity == pytest.approx(2048)
    assert not uniform.flags
    one_code = np.zeros(2048, np.int64)
    one_code[7] = 5000
    dead = report.level_stats(1, one_code)
    assert dead.used == 1 and dead.entropy_bits == 0 and dead.flags == ["unused: one code only"]
    few = np.zeros(2048, np.int64)
    few[:40] = 100  # 40 codes used (< 102.4), 5.32 bits (< 5.5): both under the thresholds
    flags = report.level_stats(2, few).flags
    assert len(flags) == 2 and "uses 40 of 2048" in flags[0] and "entropy 5.322" in flags[1]
    assert report.level_stats(3, np.zeros(2048, np.int64)).flags == []  # nothing written yet: not flagged
    # a small sample is judged against what it could attain: 100 frames over 90 codes is fine
    small = np.zeros(2048, np.int64)
    small[:90] = 1
    small[0] += 10
    assert not report.level_stats(4, small).flags


# --- the HTML page, in a real browser -------------------------------------------------------------------------------


def _browser() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium on PATH: the HTML report is checked in a real headless browser; "
                    "install it with `apt-get install chromium` (Debian/Ubuntu)")
    return path


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    return subprocess.run([_browser(), *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


class _Dom(HTMLParser):
    """Text by element id, data-value attributes by id, img sources and every tag seen."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, str] = {}
        self.values: dict[str, str] = {}
        self.imgs: list[str] = []
        self.tags: set[str] = set()
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
            return
        if tag in ("br", "meta", "link", "input", "hr"):
            return
        self._open.append(a.get("id"))
        if a.get("id"):
            self.text[a["id"]] = ""
            if "data-value" in a:
                self.values[a["id"]] = a["data-value"]

    def handle_endtag(self, tag):
        if tag not in ("img", "br", "meta", "link", "input", "hr") and self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.text[i] += data


def _dump_dom(tmp_path: Path, page: Path) -> _Dom:
    dom = _Dom()
    dom.feed(_chromium(tmp_path, "--dump-dom", page.as_uri()).stdout)
    return dom


def test_html_page_in_browser(output, independent, tmp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["report", output, "--html", str(page)]) == 0
    assert f"report page: {page}" in capsys.readouterr().out
    source = page.read_text()
    # self-contained: plots embedded as PNG data URIs, nothing fetched from elsewhere
    assert source.count('src="data:image/png;base64,') >= 4
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", source) and "<script" not in source
    assert "<link" not in source and "@import" not in source and "url(" not in source

    m = manifest.read_manifest(output)
    t = m["totals"]
    dom = _dump_dom(tmp_path, page)
    assert dom.text["hours"] == report.fmt_hours(t["hours"]) and float(dom.values["hours"]) == t["hours"]
    assert dom.text["clips"] == "5" and int(dom.values["clips"]) == t["clips"] == 5
    assert dom.text["failed-clips"] == "2 (28.57%)" and int(dom.values["failed-clips"]) == t["failed_clips"]
    assert dom.text["frames"] == f"{t['frames']:,}" and int(dom.values["frames"]) == t["frames"]
    assert dom.text["tokens"].startswith(f"{t['tokens']:,} ")
    assert dom.text["status"] == "complete" and dom.text["shards"] == f"{t['shards']}/{t['shards']}"
    assert dom.text["model-sha256"] == m["model"]["sha256"] and dom.text["model-k"] == str(K)
    assert ("untrained-banner" in dom.text) == bool(m["model"].get("untrained"))
    for level, s in independent.items():
        assert dom.text[f"entropy-{level}"] == report.fmt_bits(s["entropy"])
        assert float(dom.values[f"entropy-{level}"]) == pytest.approx(s["entropy"], abs=1e-9)
        assert int(dom.values[f"used-{level}"]) == s["used"] and dom.text[f"used-{level}"] == f"{s['used']:,}"
        assert dom.text[f"perplexity-{level}"] == report.fmt_perplexity(s["perplexity"])
    assert "DecodeError" in dom.text["failures"] and "corrupt.wav" in dom.text["failures"]
    # the text summary shows the same figures, formatted the same way
    text = report.render_text(report.collect(output))
    for key in ("hours", "clips", "failed-clips", "frames", "tokens", "speed"):
        assert f"  {dom.text[key]}\n" in text + "\n", key
    # every embedded image decodes as a PNG
    assert len(dom.imgs) >= 4
    from PIL import Image  # pillow comes with matplotlib

    for src in dom.imgs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.size[0] > 200

    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", page.as_uri())
    assert shot.stat().st_size > 50_000
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 2000)
    pixels = np.asarray(img)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text and plots, not a blank page
    keep = Path(output).parent / "report-screenshot.png"
    shutil.copy(shot, keep)  # left next to the output for a look


def test_html_banners_escaping_and_secrets(output, tmp_path):
    data = report.collect(output)
    data.manifest = copy.deepcopy(data.manifest)
    data.manifest["model"].update(untrained=True, note="generated <weights> & no meaning")
    data.manifest["config"]["storage_options"] = {"secret": "hunter2", "token": "tok-123"}
    data.manifest["config"]["input"] = "s3://user:pw123@host/bucket"
    evil = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
    cls = next(iter(data.failures_by_class))
    data.failures_by_class[cls][0] = {**data.failures_by_class[cls][0], "message": evil, "clip_id": "a&b<c>"}
    data.levels[3] = report.level_stats(3, np.eye(1, 2048, 5, dtype=np.int64)[0] * data.levels[3].total)
    source = report.render_html(data)
    for secret in ("hunter2", "tok-123", "pw123"):
        assert secret not in source
    assert html.escape(evil) in source and evil not in source and "a&amp;b&lt;c&gt;" in source
    text = report.render_text(data)
    assert text.startswith("!! UNTRAINED MODEL") and "!! COLLAPSED/UNUSED CODEBOOK LEVELS: 3 of 8" in text

    page = tmp_path / "page.html"
    page.write_text(source)
    dom = _dump_dom(tmp_path, page)
    assert "UNTRAINED MODEL" in dom.text["untrained-banner"]
    assert "generated <weights> & no meaning" in dom.text["untrained-banner"] and dom.text["model-untrained"] == "YES"
    assert "COLLAPSED/UNUSED CODEBOOK LEVELS: 3 of 8" in dom.text["collapsed-banner"]
    assert "script" not in dom.tags and all(src.startswith("data:image/png") for src in dom.imgs)
    assert evil in dom.text["failures"]  # shown as text
    shot = tmp_path / "banners.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", page.as_uri())
    shutil.copy(shot, Path(output).parent / "banners-screenshot.png")
