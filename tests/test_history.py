import json

from canopy_monitor.sinks import HistoryWriter, read_history


def test_read_history_skips_non_points(tmp_path):
    path = tmp_path / "history.jsonl"
    lines = [
        json.dumps({"step": 0, "metrics": {"canopy/ce_star": 1.0}}),
        json.dumps({}),
        json.dumps([1, 2]),
        json.dumps({"step": "2"}),
        json.dumps({"step": 4, "metrics": {}}),
        '{"step": 6, "metr',
    ]
    path.write_text("\n".join(lines))

    assert [record["step"] for record in read_history(path)] == [0, 4]


def test_append_after_cut_line_starts_new_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps({"step": 0, "metrics": {}}) + '\n{"step": 2, "me')

    HistoryWriter(path).append(4, {"canopy/ce_star": float("nan")})

    assert [record["step"] for record in read_history(path)] == [0, 4]
    assert read_history(path)[1]["metrics"]["canopy/ce_star"] is None


def test_keep_until_drops_later_points(tmp_path):
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(path)
    for step in [0, 2, 4, 6]:
        writer.append(step, {"canopy/ce_star": float(step)})

    remaining = writer.keep_until(3)

    assert [record["step"] for record in remaining] == [0, 2]
    assert writer.steps() == [0, 2]
    assert not (tmp_path / "history.jsonl.tmp").exists()
