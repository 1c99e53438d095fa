"""`canopy-monitor report` on damaged, odd, hostile, large and still-growing runs.

Each run is written by hand, as the callback would write it or worse, so every
value on the page is known. The page must escape every text it did not write
itself, skip what it cannot read, and fail with one line and exit code 2 on an
input it cannot use.
"""

import html.parser
import json
import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from canopy_monitor.cli.main import main
from canopy_monitor.report import figures, load_run, write_report
from canopy_monitor.sinks import HistoryWriter
from canopy_monitor.sinks.rollout_records import RolloutRecords

from test_report import axes_titled, embedded_images, line_labelled, point_metrics, rollout_record, write_run

HOSTILE = '<script>alert("x")</script>&\'<img src=x onerror=alert(1)>'
# Tags the page itself writes. Any other tag on the page came from the run's data.
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td",
    "span", "figure", "img", "figcaption", "ul", "li",
}
HEADLINE_TITLES = [
    "canopy entropy CE*",
    "entropy rate r",
    "mean length E[N]",
    "length-rate correlation ρ(N, r)",
    "truncation rate",
]


class TagCollector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.image_sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.image_sources.append(dict(attrs)["src"])


def history_path(run_dir: Path) -> Path:
    return run_dir / "canopy_monitor" / "history.jsonl"


def records_folder(run_dir: Path) -> Path:
    return run_dir / "canopy_monitor" / "rollouts"


def history_line(step, *, units: str = "nats", **metric_values) -> str:
    return json.dumps({"step": step, "units": units, "metrics": point_metrics(step, **metric_values), "prompts": []})


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_record_file(run_dir: Path, name: str, content) -> None:
    folder = records_folder(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / name).write_text(text, encoding="utf-8")


def report_exit(run_dir: Path, output: Path, capsys) -> tuple[int, str, str]:
    code = main(["report", str(run_dir), "--output", str(output)])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


# Damaged histories


def test_garbage_lines_and_step_order(tmp_path, capsys):
    history = history_path(tmp_path)
    write_lines(
        history,
        [
            "garbage",
            "[1, 2]",
            '{"step": "4", "metrics": {}}',
            '{"step": 4.0, "metrics": {}}',
            history_line(5, ce_star=10.0),
            "",
            history_line(-3, ce_star=11.0),
            history_line(2, ce_star=12.0),
            history_line(5, ce_star=13.0),
            history_line(0, ce_star=14.0),
        ],
    )
    with history.open("ab") as handle:
        handle.write(b'{"step": 7, "metrics": {"canopy/ce_star": 1\xff\xfe}}\n{"step": 9, "metr')

    run = load_run(tmp_path)
    code, _, _ = report_exit(tmp_path, tmp_path / "out", capsys)

    # A step written twice keeps its later line, as after a resume.
    assert run.steps == [-3, 0, 2, 5]
    np.testing.assert_allclose(run.series("ce_star").values, [11.0, 14.0, 12.0, 13.0])
    assert code == 0
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "4, at steps -3, 0, 2, 5" in page
    line = line_labelled(axes_titled(figures.headline_figure(run), "canopy entropy CE*"), "canopy entropy CE*")
    assert list(line.get_xdata()) == [-3.0, 0.0, 2.0, 5.0]


def test_all_nan_history(tmp_path, capsys):
    names = point_metrics(0, change=True)
    write_lines(
        history_path(tmp_path),
        [json.dumps({"step": step, "units": "nats", "metrics": dict.fromkeys(names)}) for step in (0, 2, 4)],
    )

    run = load_run(tmp_path)
    figure = figures.headline_figure(run)
    code, _, _ = report_exit(tmp_path, tmp_path / "out", capsys)

    assert code == 0
    for title in HEADLINE_TITLES:
        axes = axes_titled(figure, title)
        assert "undefined at every point" in [text.get_text() for text in axes.texts], title
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    # Seven figures, each undefined at the first and last point and in its change.
    assert page.count('<td class="number">undefined</td>') == 7 * 3


def test_points_without_metrics(tmp_path, capsys):
    write_lines(history_path(tmp_path), ['{"step": 0}', '{"step": 3, "metrics": null}', '{"step": 5, "metrics": [1, 2]}'])

    code, out, _ = report_exit(tmp_path, tmp_path / "out", capsys)

    assert code == 0
    assert out == str(tmp_path / "out" / "report.html")
    assert load_run(tmp_path).steps == [0, 3, 5]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "none (the run used bootstrap_samples=0)" in page


def test_large_values_and_infinity(tmp_path, capsys):
    lines = [history_line(0, ce_star=1e30), history_line(2, ce_star=-1e30), history_line(4, ce_star=-5.0)]
    # The callback writes NaN and infinities as null, but a hand-edited file may hold an overflowing literal.
    lines.append(history_line(6, ce_star=12345.0).replace("12345.0", "1e400"))
    write_lines(history_path(tmp_path), lines)

    run = load_run(tmp_path)
    code, _, _ = report_exit(tmp_path, tmp_path / "out", capsys)

    assert code == 0
    assert run.series("ce_star").values[-1] == math.inf
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert '<td class="number">1e+30 <span class="interval">[1e+30, 1e+30]</span></td>' in page


def test_invalid_units_exit_2(tmp_path, capsys):
    write_lines(history_path(tmp_path), [history_line(0), history_line(2, units="furlongs"), history_line(4)])

    code, out, err = report_exit(tmp_path, tmp_path / "out", capsys)

    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "invalid units 'furlongs' at step 2" in err
    assert str(history_path(tmp_path)) in err


def test_units_of_records_follow_history(tmp_path):
    write_lines(history_path(tmp_path), [history_line(0, units="bits")])
    record = rollout_record(0, [3, 5], [1.0, 2.0])
    write_record_file(tmp_path, "step-00000000.json", record)

    run = load_run(tmp_path)

    (point,) = run.rollouts
    np.testing.assert_allclose(point.entropy_rates, [1.0 / math.log(2.0), 2.0 / math.log(2.0)])
    np.testing.assert_allclose(point.lengths, [3, 5])


# Damaged rollout records


def test_unusable_records_skipped(tmp_path, capsys):
    write_run(tmp_path, [0, 2, 4])
    valid = rollout_record(4, [3, 16, 7], [1.0, 2.0, 1.5])
    partly_valid = rollout_record(11, [5, 6, 9], [1.2, 1.1, 2.1])
    partly_valid["prompts"][0]["lengths"][1] = "six"
    mismatched = rollout_record(8, [1, 2], [1.0, 2.0])
    mismatched["prompts"][0]["entropy_rates"] = [1.0]
    missing_lengths = rollout_record(10, [1, 2], [1.0, 2.0])
    del missing_lengths["prompts"][0]["lengths"]
    other_units = rollout_record(12, [1, 2], [1.0, 2.0])
    other_units["units"] = "furlongs"
    files = {
        "step-00000000.json": {"step": 0, "prompts": {"prompt": "p"}},
        "step-00000001.json": [1, 2],
        "step-00000002.json": "null",
        "step-00000005.json": {**valid, "step": "5"},
        "step-00000006.json": {**valid, "step": 6, "prompts": []},
        "step-00000007.json": rollout_record(7, [], []),
        "step-00000008.json": mismatched,
        "step-00000009.json": '{"step": 9, "prompts": [',
        "step-00000010.json": missing_lengths,
        "step-00000012.json": other_units,
        "step-00000004.json": valid,
        "step-00000011.json": partly_valid,
        "step-00000013.json.tmp": rollout_record(13, [1, 2], [1.0, 2.0]),
        "notes.txt": "not a record",
    }
    for name, content in files.items():
        write_record_file(tmp_path, name, content)
    (records_folder(tmp_path) / "step-00000003.json").mkdir()

    run = load_run(tmp_path)
    scatter = figures.length_rate_scatter_figure(run)
    code, _, _ = report_exit(tmp_path, tmp_path / "out", capsys)

    assert [point.step for point in run.rollouts] == [4, 11]
    # A length that is not a number is left out of the scatter, not drawn at 0.
    np.testing.assert_allclose(scatter.axes[1].collections[0].get_offsets(), [[5, 1.2], [9, 2.1]])
    # Step 11 has a record but no history line, so its title has no correlation.
    assert scatter.axes[1].get_title() == "step 11"
    assert code == 0


def test_record_prompt_not_an_object(tmp_path, capsys):
    write_run(tmp_path, [0, 2])
    record = rollout_record(0, [3, 5, 7], [1.0, 2.0, 1.5])
    record["prompts"] += ["a prompt as a bare string", None, 7]
    write_record_file(tmp_path, "step-00000000.json", record)

    code, _, _ = report_exit(tmp_path, tmp_path / "out", capsys)

    assert code == 0
    (point,) = load_run(tmp_path).rollouts
    np.testing.assert_allclose(point.lengths, [3, 5, 7])


# Run directories and output folders


def test_run_dir_is_monitor_folder(tmp_path, capsys):
    run_dir = tmp_path / "my-run"
    write_run(run_dir, [0, 2], records={0: rollout_record(0, [3, 5, 7], [1.0, 2.0, 1.5])})

    code = main(["report", str(run_dir / "canopy_monitor")])
    out = capsys.readouterr().out.strip()

    page = run_dir / "canopy_monitor" / "report" / "report.html"
    assert code == 0
    assert out == str(page)
    text = page.read_text(encoding="utf-8")
    assert "<h1>canopy-monitor report: my-run</h1>" in text
    assert f"<tr><th>run directory</th><td>{run_dir}</td></tr>" in text


def test_run_dir_is_a_file_exit_2(tmp_path, capsys):
    not_a_folder = tmp_path / "history.jsonl"
    not_a_folder.write_text(history_line(0) + "\n", encoding="utf-8")

    code, out, err = report_exit(not_a_folder, tmp_path / "out", capsys)

    assert code == 2
    assert out == ""
    assert err == f"canopy-monitor report: error: not a directory: {not_a_folder} (expected the trainer's output_dir)"


def test_path_with_spaces_and_unicode(tmp_path, capsys):
    run_dir = tmp_path / "runs with spaces" / "sft ü 日本 & <1>"
    write_run(run_dir, [0, 2], records={0: rollout_record(0, [3, 5, 7], [1.0, 2.0, 1.5])})
    output = tmp_path / "report folder é"

    code, out, _ = report_exit(run_dir, output, capsys)

    assert code == 0
    assert out == str(output / "report.html")
    page = (output / "report.html").read_text(encoding="utf-8")
    assert "<h1>canopy-monitor report: sft ü 日本 &amp; &lt;1&gt;</h1>" in page
    assert len(embedded_images(page)) == 4


def test_directory_name_not_utf8(tmp_path, capsys):
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"run-\xff"))
    run_dir = tmp_path / os.fsdecode(b"run-\xff")
    write_run(run_dir, [0, 2])

    code, _, err = report_exit(run_dir, tmp_path / "out", capsys)

    assert code == 0, err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "decomposition.png",
        "over_training.png",
        "report.html",
    ]


def test_output_under_a_file_exit_2(tmp_path, capsys):
    write_run(tmp_path / "run", [0, 2])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder", encoding="utf-8")

    for output in (blocker / "report", blocker):
        code, out, err = report_exit(tmp_path / "run", output, capsys)

        assert code == 2
        assert out == ""
        assert len(err.splitlines()) == 1
        assert err.startswith(f"canopy-monitor report: error: cannot create the output folder {output}: ")
    assert blocker.read_text(encoding="utf-8") == "a file, not a folder"


# Text from the run on the page


def test_hostile_text_is_escaped(tmp_path):
    run_dir = tmp_path / "run <b>bold</b>"
    record = rollout_record(0, [3, 5, 7], [1.0, 2.0, 1.5])
    record["prompts"][0]["prompt"] = HOSTILE
    record["prompts"][0]["texts"] = [HOSTILE]
    write_run(run_dir, [0], records={0: record})
    HistoryWriter(history_path(run_dir)).append(
        2,
        point_metrics(2, change=True),
        units="nats",
        num_prompts=2,
        total_rollouts=6,
        undefined={HOSTILE: 2},
        prompts=[{"prompt": HOSTILE}],
    )
    settings = {
        "temperature": HOSTILE,
        "top_k": HOSTILE,
        "top_p": HOSTILE,
        "seed": HOSTILE,
        "embedding_model": HOSTILE,
        "bootstrap": {"samples": HOSTILE, "confidence": 0.9},
    }
    info = {"run_name": HOSTILE, "model": HOSTILE, "trainer": HOSTILE, "started": HOSTILE, "max_steps": 4}
    (run_dir / "canopy_monitor" / "run.json").write_text(json.dumps({**info, "monitor": settings}), encoding="utf-8")

    page = write_report(run_dir).read_text(encoding="utf-8")

    parser = TagCollector()
    parser.feed(page)
    assert parser.tags <= PAGE_TAGS, parser.tags - PAGE_TAGS
    assert len(parser.image_sources) == 4
    assert all(source.startswith("data:image/png;base64,") for source in parser.image_sources)
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&lt;img src=x onerror=alert(1)&gt;"
    assert f"<title>canopy-monitor report: {escaped}</title>" in page
    assert f"<tr><th>model</th><td>{escaped}</td></tr>" in page
    assert f"<li>{escaped} (2 of 2 prompts)</li>" in page
    assert "run &lt;b&gt;bold&lt;/b&gt;" in page


# Large and growing runs


def test_five_hundred_points(tmp_path):
    generator = random.Random(0)
    lines = [
        history_line(step, change=step > 0, ce_star=40.0 - 0.01 * step + generator.random()) for step in range(0, 5000, 10)
    ]
    write_lines(history_path(tmp_path), lines)
    for step in (0, 4990):
        lengths = [generator.randint(1, 128) for _ in range(512)]
        record = rollout_record(step, lengths, [4.0 * generator.random() for _ in lengths])
        record["max_new_tokens"] = 128
        RolloutRecords(records_folder(tmp_path)).write(record)

    run = load_run(tmp_path)
    page_path = write_report(tmp_path)

    assert len(run.steps) == 500
    # The page was 624 KB with matplotlib 3.11, almost all of it the four embedded PNGs. No text grows per point.
    assert page_path.stat().st_size < 2_000_000
    page = page_path.read_text(encoding="utf-8")
    assert "500, at steps 0, 10, 20, 30, 40, 50, …, 4940, 4950, 4960, 4970, 4980, 4990" in page
    line = line_labelled(axes_titled(figures.headline_figure(run), "canopy entropy CE*"), "canopy entropy CE*")
    assert len(line.get_xdata()) == 500
    edges = figures.histogram_edges(run, figures.compared_rollout_points(run))
    assert (edges[0], edges[-1], len(edges)) == (0.5, 128.5, 65)


def append_slowly(path: Path, line: str) -> None:
    """Append `line` in two writes, as a writer interrupted mid-line would."""
    half = len(line) // 2
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line[:half])
        handle.flush()
        time.sleep(0.002)
        handle.write(line[half:] + "\n")


def test_report_while_run_writes(tmp_path):
    write_run(tmp_path, [0], records={0: rollout_record(0, [3, 5, 7], [1.0, 2.0, 1.5])})
    written_steps = list(range(0, 400, 2))
    done = threading.Event()
    failures = []

    def training():
        folder = RolloutRecords(records_folder(tmp_path), keep_points=2)
        try:
            for step in written_steps[1:]:
                append_slowly(history_path(tmp_path), history_line(step))
                folder.write(rollout_record(step, [3, step % 16 + 1, 7], [1.0, 2.0, 1.5]))
        except Exception as error:
            failures.append(error)
        finally:
            done.set()

    writer = threading.Thread(target=training)
    writer.start()
    loaded = []
    pages = 0
    try:
        while not done.is_set() or not loaded:
            run = load_run(tmp_path)
            loaded.append((run.steps, [point.step for point in run.rollouts]))
            if pages < 2:
                write_report(run_directory=tmp_path, output_directory=tmp_path / f"out-{pages}")
                pages += 1
    finally:
        writer.join()

    assert failures == []
    for steps, recorded in loaded:
        assert steps == written_steps[: len(steps)]
        assert recorded[0] == 0
        assert set(recorded) <= set(written_steps)
    final = load_run(tmp_path)
    assert final.steps == written_steps
    assert [point.step for point in final.rollouts] == [0, written_steps[-1]]
