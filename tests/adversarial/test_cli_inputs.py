"""Odd inputs to `canopy-monitor evaluate` and `canopy-monitor train`.

An input a user can get wrong must stop the command with one line on standard error
and exit code 2, without a traceback and without writing an output file.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from canopy_monitor.cli.main import main


# A sysctl file that is write-only: reading it fails with EACCES even for root.
WRITE_ONLY_SYSCTL = Path("/proc/sys/vm/drop_caches")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hello world"}) + "\n" + json.dumps({"prompt": "tell me a story"}) + "\n")
    return path


def evaluate(model_dir, prompts, output, *extra):
    return main(
        ["evaluate", "--model", str(model_dir), "--prompts", str(prompts), "--rollouts", "3",
         "--max-new-tokens", "4", "--output", str(output), *extra]
    )


def assert_one_line_error(capsys, code, expected=None):
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    # A progress bar ends its lines with a carriage return, so both separate lines here.
    lines = [line.strip() for line in error.replace("\r", "\n").splitlines() if line.strip()]
    error_lines = [line for line in lines if ": error: " in line]
    assert len(error_lines) == 1, error
    if expected is not None:
        assert expected in error_lines[0], error_lines[0]
    return error_lines[0]


def unreadable_file(tmp_path: Path, name: str) -> Path:
    """Return a path with a usable name whose reading fails with PermissionError."""
    path = tmp_path / name
    if os.geteuid() != 0:
        path.write_text(json.dumps({"prompt": "hello world"}) + "\n")
        path.chmod(0)
        return path
    try:
        WRITE_ONLY_SYSCTL.read_text()
    except PermissionError:
        path.symlink_to(WRITE_ONLY_SYSCTL)
        return path
    except OSError:
        pass
    pytest.skip("no way to make an unreadable file here")


def unwritable_folder(tmp_path: Path) -> Path:
    """Return an existing folder in which creating a file fails with PermissionError."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        (Path("/sys") / "canopy-probe.json").open("w").close()
    except PermissionError:
        return Path("/sys")
    except OSError:
        pass
    pytest.skip("no unwritable folder here")


# evaluate: numbers


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--rollouts", "0"], "num_rollouts"),
        (["--rollouts", "-3"], "num_rollouts"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-p", "0"], "top_p"),
        (["--temperature", "0"], "temperature"),
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "-1"], "top_k"),
        (["--num-prompts", "0"], "0"),
        (["--num-prompts", "-2"], "-2"),
        (["--batch-size", "0"], "batch_size"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--max-new-tokens", "100000"], "context length"),
        (["--dtype", "no-such-dtype"], "dtype"),
    ],
)
def test_evaluate_bad_numbers_exit_2(extra, expected, model_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "out.json"

    code = evaluate(model_dir, prompts_file, output, *extra)

    assert_one_line_error(capsys, code, expected)
    assert not output.exists()


def test_evaluate_tiny_temperature_is_measured(model_dir, prompts_file, tmp_path):
    # A temperature of 1e-9 is almost greedy: every step entropy is about 0 but finite.
    output = tmp_path / "out.json"

    assert evaluate(model_dir, prompts_file, output, "--temperature", "1e-9") == 0

    report = json.loads(output.read_text())
    assert report["pooled"]["ce_star"] == pytest.approx(0.0, abs=1e-6)
    assert report["pooled"]["ce_star"] >= 0


def test_evaluate_huge_seed_error_names_the_seed(model_dir, prompts_file, tmp_path, capsys):
    # torch cannot seed with a number this large, so the error must name --seed.
    output = tmp_path / "out.json"

    code = evaluate(model_dir, prompts_file, output, "--seed", str(2**80))

    line = assert_one_line_error(capsys, code)
    assert "seed" in line
    assert not output.exists()


def test_evaluate_unknown_device_exit_2(model_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "out.json"

    code = evaluate(model_dir, prompts_file, output, "--device", "no-such-device")

    assert_one_line_error(capsys, code, "no-such-device")
    assert not output.exists()


# evaluate: output path


def test_evaluate_output_in_missing_folder_is_created(model_dir, prompts_file, tmp_path):
    output = tmp_path / "a" / "b" / "out.json"

    assert evaluate(model_dir, prompts_file, output) == 0

    assert json.loads(output.read_text())["config"]["num_rollouts"] == 3


def test_evaluate_output_is_a_directory_exit_2(model_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "existing-folder"
    output.mkdir()

    code = evaluate(model_dir, prompts_file, output)

    assert_one_line_error(capsys, code, str(output))


def test_evaluate_output_parent_is_a_file_exit_2(model_dir, prompts_file, tmp_path, capsys):
    parent = tmp_path / "plain-file"
    parent.write_text("x")

    code = evaluate(model_dir, prompts_file, parent / "out.json")

    assert_one_line_error(capsys, code)
    assert parent.read_text() == "x"


def test_evaluate_output_under_a_file_deeper_exit_2(model_dir, prompts_file, tmp_path, capsys):
    parent = tmp_path / "plain-file"
    parent.write_text("x")

    code = evaluate(model_dir, prompts_file, parent / "sub" / "out.json")

    assert_one_line_error(capsys, code)


def test_evaluate_output_in_unwritable_folder_exit_2(model_dir, prompts_file, tmp_path, capsys):
    folder = unwritable_folder(tmp_path)

    code = evaluate(model_dir, prompts_file, folder / "canopy-out.json")

    assert_one_line_error(capsys, code)
    assert not (folder / "canopy-out.json").exists()


# evaluate: prompt files


@pytest.mark.parametrize(
    "name, content, expected_prompts",
    [
        ("bom.jsonl", b'\xef\xbb\xbf{"prompt": "hello world"}\n', ["hello world"]),
        ("crlf.jsonl", b'{"prompt": "hello world"}\r\n\r\n{"prompt": "tell me"}\r\n', ["hello world", "tell me"]),
        ("bom.json", b'\xef\xbb\xbf[{"prompt": "hello world"}]', ["hello world"]),
        ("upper.JSONL", b'{"prompt": "hello world"}\n', ["hello world"]),
    ],
)
def test_evaluate_accepts_bom_and_crlf(name, content, expected_prompts, model_dir, tmp_path):
    prompts = tmp_path / name
    prompts.write_bytes(content)
    output = tmp_path / "out.json"

    assert evaluate(model_dir, prompts, output) == 0

    assert [entry["prompt"] for entry in json.loads(output.read_text())["prompts"]] == expected_prompts


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("strings.json", b'["hello", "world"]', "item 0"),
        ("number.jsonl", b'{"prompt": 3}\n', "line 1"),
        ("nan.jsonl", b'{"prompt": NaN}\n', "line 1"),
        ("null.jsonl", b'{"prompt": null}\n', "line 1"),
        ("nested.jsonl", json.dumps({"prompt": [{"role": "user", "content": {"a": [[{"b": 1}]]}}]}).encode() + b"\n", "content"),
        ("parts.jsonl", json.dumps({"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}).encode() + b"\n", "content"),
        ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', "UTF-8"),
        ("utf16.jsonl", '{"prompt": "hello"}\n'.encode("utf-16"), "UTF-8"),
        ("dict.json", b'{"prompt": "x"}', "list"),
        ("blank.jsonl", b"\n\n  \n", "empty"),
        ("prompts.txt", b'{"prompt": "x"}\n', "extension"),
    ],
)
def test_evaluate_bad_prompt_file_exit_2(name, content, expected, model_dir, tmp_path, capsys):
    prompts = tmp_path / name
    prompts.write_bytes(content)
    output = tmp_path / "out.json"

    code = evaluate(model_dir, prompts, output)

    assert_one_line_error(capsys, code, expected)
    assert not output.exists()


def test_evaluate_prompts_path_is_directory_exit_2(model_dir, tmp_path, capsys):
    folder = tmp_path / "prompts.jsonl"
    folder.mkdir()

    code = evaluate(model_dir, folder, tmp_path / "out.json")

    assert_one_line_error(capsys, code, "not a file")


def test_evaluate_huge_prompt_line_exit_2(model_dir, tmp_path, capsys):
    prompts = tmp_path / "huge.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello " * 200_000}) + "\n")

    code = evaluate(model_dir, prompts, tmp_path / "out.json")

    assert_one_line_error(capsys, code, "context length")


def test_evaluate_unreadable_prompts_exit_2(model_dir, tmp_path, capsys):
    prompts = unreadable_file(tmp_path, "secret.jsonl")

    code = evaluate(model_dir, prompts, tmp_path / "out.json")

    assert_one_line_error(capsys, code, "secret.jsonl")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_evaluate_deeply_nested_prompts_exit_2(name, model_dir, tmp_path, capsys):
    # Syntactically valid JSON nested deeper than Python's recursion limit.
    depth = 100_000
    nested = "[" * depth + "]" * depth
    prompts = tmp_path / name
    prompts.write_text(nested if name.endswith(".json") else '{"prompt": ' + nested + "}\n")

    code = evaluate(model_dir, prompts, tmp_path / "out.json")

    assert_one_line_error(capsys, code, name)


def test_evaluate_lone_surrogate_prompt_exit_2(model_dir, tmp_path, capsys):
    # "\ud800" is a valid JSON escape that decodes to a lone surrogate, which no tokenizer can encode.
    prompts = tmp_path / "surrogate.jsonl"
    prompts.write_text('{"prompt": "hello \\ud800 world"}\n')

    code = evaluate(model_dir, prompts, tmp_path / "out.json")

    assert_one_line_error(capsys, code)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_string_may_contain_unicode_line_separators(separator, model_dir, tmp_path):
    # JSON allows these characters unescaped inside strings, and `json.dumps(..., ensure_ascii=False)`
    # writes them so. JSON Lines separates records by "\n" only.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": f"hello{separator}world"}, ensure_ascii=False) + "\n", encoding="utf-8")
    output = tmp_path / "out.json"

    assert evaluate(model_dir, prompts, output) == 0

    assert json.loads(output.read_text())["prompts"][0]["prompt"] == f"hello{separator}world"


# train


@pytest.fixture
def train_inputs(tmp_path, model_dir):
    examples = tmp_path / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"what is w{i} ?"}, {"role": "assistant", "content": f"w{i} is the answer ."}]}
        for i in range(8)
    ]
    examples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    recipe = {
        "model": str(model_dir),
        "dataset": {"path": str(examples)},
        "monitor": {"prompts": str(prompts), "every_n_steps": 1, "num_rollouts": 2, "max_new_tokens": 4},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 32,
            "report_to": "none",
            "save_strategy": "no",
            "bf16": False,
            "use_cpu": True,
            "disable_tqdm": True,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_tiny_recipe_runs(train_inputs, tmp_path):
    assert main(["train", str(train_inputs)]) == 0

    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "canopy_monitor" / "history.jsonl").read_text().splitlines()]
    assert steps == [0, 1]


@pytest.mark.parametrize(
    "content, extra, expected",
    [
        ("- a\n- b\n", [], "mapping"),
        ("", [], "model"),
        ("model: [1, 2]\n", [], "model"),
        ("model: x\nmonitor: 5\n", [], "monitor"),
        ("model: x\nfoo: 1\n", [], "foo"),
        ("model: x\nmonitor: {every_n_steps: 0}\n", [], "every_n_steps"),
        ("model: x\nmonitor: {every_n_steps: 2.5}\n", [], "every_n_steps"),
        ("model: x\nmonitor: {num_rollouts: 1}\n", [], "num_rollouts"),
        ("model: x\n", ["--no_such_field", "3"], "no_such_field"),
        ("model: x\n", ["--max_steps", "abc"], "max_steps"),
        ("model: x\n", ["--seed", "3"], "ambiguous"),
        ("model: x\n", ["--monitor.top_p", "1.5"], "top_p"),
        ("model: x\n", ["--num_rollouts", "0"], "num_rollouts"),
        ("model: x\n", ["stray"], "stray"),
        ("!!python/object/apply:os.system ['echo unsafe']\n", [], "YAML"),
    ],
)
def test_train_bad_recipe_exit_2(content, extra, expected, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)

    code = main(["train", str(recipe), *extra])

    assert_one_line_error(capsys, code, expected)


def test_train_recipe_yaml_syntax_error_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: x\n\tbad: tab\n")

    code = main(["train", str(recipe)])

    error = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in error
    assert len(error.strip().splitlines()) == 1, error


def test_train_recipe_not_utf8_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"model: caf\xe9\n")

    code = main(["train", str(recipe)])

    assert_one_line_error(capsys, code, "recipe.yaml")


def test_train_output_dir_is_a_file_exit_2(train_inputs, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")

    code = main(["train", str(train_inputs), "--output_dir", str(blocker)])

    assert_one_line_error(capsys, code, "blocker")
    assert blocker.read_text() == "x"


def test_train_output_dir_unwritable_exit_2(train_inputs, tmp_path, capsys):
    folder = unwritable_folder(tmp_path)

    code = main(["train", str(train_inputs), "--output_dir", str(folder / "canopy-run")])

    assert_one_line_error(capsys, code)


def test_evaluate_tiny_subnormal_temperature(model_dir, prompts_file, tmp_path, capsys):
    # SamplingConfig accepts any temperature above 0; below about 1e-38 the scaled float32
    # logits overflow to inf. The command must either measure or refuse the value in one line.
    output = tmp_path / "out.json"

    code = evaluate(model_dir, prompts_file, output, "--temperature", "1e-45")

    if code == 0:
        report = json.loads(output.read_text())
        assert report["pooled"]["ce_star"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert_one_line_error(capsys, code, "temperature")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_evaluate_output_disk_full_exit_2(model_dir, prompts_file, capsys):
    # /dev/full fails every write with ENOSPC, as a full disk does.
    code = evaluate(model_dir, prompts_file, "/dev/full")

    assert_one_line_error(capsys, code)


def test_evaluate_write_failure_leaves_no_half_written_output(model_dir, prompts_file, tmp_path):
    # The file-size limit makes the write fail part-way, as a full disk does. The earlier
    # result at the same path must survive, or no file be left; never a cut JSON document.
    resource = pytest.importorskip("resource")
    import signal

    output = tmp_path / "out.json"
    assert evaluate(model_dir, prompts_file, output) == 0
    earlier = output.read_text()
    limit = len(earlier.encode()) // 2

    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        try:
            code = evaluate(model_dir, prompts_file, output, "--seed", "1")
        except OSError:
            code = None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)

    if output.exists():
        left = output.read_text()
        assert left == earlier, f"{len(left)} of {len(earlier)} characters left at the output path"
    assert code == 2
