"""The monitor's scalars in the TensorBoard, MLflow, trackio and W&B integrations of transformers.

Each test trains a tiny model with the real integration writing to a folder under
`tmp_path`, reads what the backend stored through the backend's own reader, and
compares it with the history file. Three rollouts per prompt make the pooled
correlations NaN at every point (they need at least 4), so every backend must
store NaN values too.
"""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import pytest

from conftest import make_model, make_tokenizer, toy_conversations
from wandb_records import history_rows as wandb_history_rows

HELDOUT = ["what is the sum of two plus two ?", "how do i write a python function"]
NUM_ROLLOUTS = 3
# A figure that is NaN at every point with NUM_ROLLOUTS rollouts per prompt.
NAN_METRIC = "canopy/rho_length_rate"
# Environment variables of the MLflow and trackio integrations that could send the run elsewhere.
MLFLOW_VARIABLES = (
    "DISABLE_MLFLOW_INTEGRATION",
    "HF_MLFLOW_LOG_ARTIFACTS",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_NESTED_RUN",
    "MLFLOW_RUN_ID",
    "MLFLOW_TAGS",
)
TRACKIO_VARIABLES = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID")


def train_with_monitor(output_dir: Path, *, max_steps: int, report_to: list[str], **arguments):
    """Train the tiny model for `max_steps` with the monitor every 2 steps, and return the trainer and the history."""
    from trl import SFTConfig, SFTTrainer

    from canopy_monitor import CanopyMonitorCallback

    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        seed=42,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **arguments,
    )
    trainer = SFTTrainer(
        model=make_model(seed=0),
        args=args,
        train_dataset=toy_conversations(),
        processing_class=make_tokenizer(),
    )
    trainer.add_callback(
        CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=2, num_rollouts=NUM_ROLLOUTS, max_new_tokens=8)
    )
    trainer.train()

    history_path = output_dir / "canopy_monitor" / "history.jsonl"
    history = [json.loads(line) for line in history_path.read_text().splitlines()]
    return trainer, history


def assert_point_received(received: dict[str, float], record: dict, *, rel: float = 0.0) -> None:
    """Check that a backend received every scalar of one history record, and NaN where the history has `null`."""
    step = record["step"]
    expected = record["metrics"]
    assert sorted(received) == sorted(expected), f"step {step}"
    for name, value in expected.items():
        if value is None:
            # The history writes NaN (and infinities) as null.
            assert not math.isfinite(received[name]), f"{name} at step {step}: {received[name]}"
        elif rel == 0.0:
            assert received[name] == value, f"{name} at step {step}"
        else:
            assert received[name] == pytest.approx(value, rel=rel, abs=1e-30), f"{name} at step {step}"


def training_losses(trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture
def network_attempts(monkeypatch):
    """Record and reject every IPv4 or IPv6 connection that a test opens, so that the test can assert there was none."""
    attempts = []
    connect = socket.socket.connect

    def reject_network(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access in an offline test: {address!r}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", reject_network)
    return attempts


# TensorBoard


def test_tensorboard_events_contain_every_point(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # transformers 5.25 has no `logging_dir` argument. Its TensorBoard callback reads this variable instead.
    log_dir = tmp_path / "tensorboard"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    # With 3 steps the last point (step 3) is off the schedule of every 2 steps, so it
    # is the point taken when training ends.
    trainer, history = train_with_monitor(tmp_path / "out", max_steps=3, report_to=["tensorboard"])

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert [event.step for event in accumulator.Scalars("train/canopy/ce_star")] == [0, 2, 3]
    assert [record["step"] for record in history] == [0, 2, 3]
    canopy_tags = {tag for tag in tags if tag.startswith("train/canopy/")}
    assert canopy_tags == {f"train/{name}" for record in history for name in record["metrics"]}
    for record in history:
        events = [(tag, event) for tag in canopy_tags for event in accumulator.Scalars(tag) if event.step == record["step"]]
        received = {tag.removeprefix("train/"): event.value for tag, event in events}
        assert len(received) == len(events), f"a tag has two events at step {record['step']}"
        # TensorBoard stores scalars as float32.
        assert_point_received(received, record, rel=1e-6)

    for name in ("ce_star_ci_low", "ce_star_ci_high", "rho_length_rate_ci_low", "change/ce_star_ci_high"):
        assert f"train/canopy/{name}" in tags
    nan_values = [event.value for event in accumulator.Scalars(f"train/{NAN_METRIC}")]
    assert len(nan_values) == 3
    assert all(math.isnan(value) for value in nan_values)
    losses = [(event.step, event.value) for event in accumulator.Scalars("train/loss")]
    assert [step for step, _ in losses] == [1, 2, 3]
    assert losses == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in training_losses(trainer)]


# MLflow


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """Point MLflow at a file store in `tmp_path` and end any run a test leaves active."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    # MLflow 3.18 raises on the file store unless this is set. The sqlite store needs
    # SQLAlchemy, which mlflow-skinny does not install.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # MLflow 3.18 turns its usage telemetry off under pytest only when it is imported
    # inside a test, so it is turned off here whatever imported it first.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for variable in MLFLOW_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()


def mlflow_points(client, run_id: str, names) -> dict[int, dict[str, float]]:
    """Return the run's values of `names`, step by step."""
    points: dict[int, dict[str, float]] = {}
    for name in names:
        for metric in client.get_metric_history(run_id, name):
            assert name not in points.setdefault(metric.step, {}), f"{name} logged twice at step {metric.step}"
            points[metric.step][name] = metric.value
    return points


def test_mlflow_run_contains_every_point(tmp_path, mlflow_store, network_attempts):
    mlflow = mlflow_store

    trainer, history = train_with_monitor(tmp_path / "out", max_steps=4, report_to=["mlflow"])

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    client = mlflow.tracking.MlflowClient()
    canopy_names = {name for name in run.data.metrics if name.startswith("canopy/")}
    assert canopy_names == {name for record in history for name in record["metrics"]}
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "canopy/ce_star")] == [0, 2, 4]
    points = mlflow_points(client, run.info.run_id, canopy_names)
    assert sorted(points) == [record["step"] for record in history] == [0, 2, 4]
    for record in history:
        # MLflow keeps float64 values.
        assert_point_received(points[record["step"]], record)

    nan_values = [metric.value for metric in client.get_metric_history(run.info.run_id, NAN_METRIC)]
    assert len(nan_values) == 3
    assert all(math.isnan(value) for value in nan_values)
    losses = [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, "loss")]
    assert losses == training_losses(trainer)
    assert network_attempts == []


def test_mlflow_point_at_train_end_in_same_run(tmp_path, mlflow_store):
    mlflow = mlflow_store

    # With 3 steps the last point (step 3) is off the schedule, so it is taken when training stops.
    _, history = train_with_monitor(tmp_path / "out", max_steps=3, report_to=["mlflow"])

    assert [record["step"] for record in history] == [0, 2, 3]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    steps = [metric.step for metric in mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, "canopy/ce_star")]
    assert steps == [0, 2, 3]


# trackio


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory):
    """Import trackio with its storage folder in a temporary folder.

    trackio reads `TRACKIO_DIR` once, when it is imported, and its modules copy the
    path. An earlier test of the session may have imported it already, so the copies
    are replaced too. Each test logs to its own project inside that folder.
    """
    directory = tmp_path_factory.mktemp("trackio")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKIO_DIR", str(directory))
        pytest.importorskip("trackio")
        for name, module in list(sys.modules.items()):
            if (name == "trackio" or name.startswith("trackio.")) and hasattr(module, "TRACKIO_DIR"):
                patch.setattr(module, "TRACKIO_DIR", directory)
        yield directory


@pytest.fixture
def trackio_project(tmp_path, trackio_dir, monkeypatch):
    """Return a project name for this test, with no Space, server or bucket configured, and finish any run left open."""
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    for variable in TRACKIO_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    project = f"canopy-monitor-{tmp_path.name}"
    assert SQLiteStorage.get_project_db_path(project).parent == trackio_dir, (
        "trackio was imported before TRACKIO_DIR was set, so it would write outside the test's folder"
    )
    yield project
    if trackio.context_vars.current_run.get() is not None:
        trackio.finish()


def trackio_points(project: str) -> dict[str, dict[int, dict]]:
    """Return the logged entries with monitor scalars of each run of `project`, by the trainer's global step."""
    from trackio.sqlite_storage import SQLiteStorage

    runs = {}
    for run in SQLiteStorage.get_runs(project):
        points = {}
        for entry in SQLiteStorage.get_logs(project, run):
            if "train/canopy/ce_star" in entry:
                # trackio's own `step` counts the log calls. The integration logs the
                # trainer's step as `train/global_step`.
                points[int(entry["train/global_step"])] = entry
        runs[run] = points
    return runs


def test_trackio_run_contains_every_point(tmp_path, trackio_project, network_attempts):
    from trackio.sqlite_storage import SQLiteStorage

    trainer, history = train_with_monitor(
        tmp_path / "out", max_steps=4, report_to=["trackio"], project=trackio_project, trackio_static_space_id=False
    )

    assert SQLiteStorage.get_project_db_path(trackio_project).is_file()
    runs = trackio_points(trackio_project)
    assert len(runs) == 1
    points = next(iter(runs.values()))
    assert sorted(points) == [record["step"] for record in history] == [0, 2, 4]
    for record in history:
        entry = points[record["step"]]
        received = {name.removeprefix("train/"): value for name, value in entry.items() if name.startswith("train/canopy/")}
        # trackio keeps float64 values and stores NaN as the string "NaN", read back as a float.
        assert_point_received(received, record)
        assert math.isnan(entry[f"train/{NAN_METRIC}"])

    run = next(iter(runs))
    losses = [
        (int(entry["train/global_step"]), entry["train/loss"])
        for entry in SQLiteStorage.get_logs(trackio_project, run)
        if "train/loss" in entry
    ]
    assert losses == training_losses(trainer)
    assert network_attempts == []


def test_trackio_point_at_train_end_in_same_run(tmp_path, trackio_project):
    import trackio

    # With 3 steps the last point (step 3) is off the schedule, so it is taken when training stops.
    _, history = train_with_monitor(
        tmp_path / "out", max_steps=3, report_to=["trackio"], project=trackio_project, trackio_static_space_id=False
    )
    # The point of step 3 goes to a second run that nothing finishes. Finishing it writes its logs.
    if trackio.context_vars.current_run.get() is not None:
        trackio.finish()

    assert [record["step"] for record in history] == [0, 2, 3]
    runs = trackio_points(trackio_project)
    assert len(runs) == 1
    assert sorted(next(iter(runs.values()))) == [0, 2, 3]


# W&B


def test_wandb_run_contains_every_point_and_nan(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "canopy-monitor-tests")

    _, history = train_with_monitor(tmp_path / "out", max_steps=4, report_to=["wandb"])
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()

    run_files = list(run_dir.glob("*.wandb"))
    assert len(run_files) == 1
    rows = [row for row in wandb_history_rows(run_files[0]) if "train/canopy/ce_star" in row]
    assert [int(float(row["train/global_step"])) for row in rows] == [record["step"] for record in history] == [0, 2, 4]
    for row, record in zip(rows, history):
        # The reader returns each value as its JSON text, and W&B writes NaN as `NaN`.
        received = {name.removeprefix("train/"): float(text) for name, text in row.items() if name.startswith("train/canopy/")}
        assert_point_received(received, record)
        assert math.isnan(received[NAN_METRIC])
