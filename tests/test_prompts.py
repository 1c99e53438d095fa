import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

from canopy_monitor.prompts import Prompt, PromptError, encode_prompts, load_prompts, model_context_length

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant",
         "hello", "world", "how", "are", "you", "?", "be", "brief"]
VOCAB = {word: index for index, word in enumerate(WORDS)}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer that prepends <s> when special tokens are added."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(*words: str) -> list[int]:
    return [VOCAB[word] for word in words]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you ?"}]


# Loading

def test_load_list_of_strings():
    prompts = load_prompts(["hello world", "how are you ?"])

    assert prompts == [Prompt(text="hello world"), Prompt(text="how are you ?")]


def test_load_list_of_conversations():
    prompts = load_prompts([CONVERSATION])

    assert len(prompts) == 1
    assert prompts[0].text is None
    assert prompts[0].messages == tuple(CONVERSATION)
    assert prompts[0].display == "how are you ?"


def test_load_copies_messages():
    conversation = [{"role": "user", "content": "hello"}]
    prompts = load_prompts([conversation])

    conversation[0]["content"] = "changed"

    assert prompts[0].messages[0]["content"] == "hello"


def test_load_list_of_records_and_prompts():
    prompts = load_prompts([{"prompt": "hello"}, Prompt(text="world")])

    assert prompts == [Prompt(text="hello"), Prompt(text="world")]


def test_load_jsonl_file(tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [json.dumps({"prompt": "hello world", "id": 1}), "", "   ", json.dumps({"prompt": CONVERSATION})],
    )

    prompts = load_prompts(path)

    assert prompts == [Prompt(text="hello world"), Prompt(messages=tuple(CONVERSATION))]


def test_load_json_file_from_str_path(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "hello"}, {"prompt": CONVERSATION}]), encoding="utf-8")

    prompts = load_prompts(str(path))

    assert prompts == [Prompt(text="hello"), Prompt(messages=tuple(CONVERSATION))]


def test_load_dataset_prompt_column():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"prompt": ["hello", "world"], "other": [1, 2]})

    assert load_prompts(dataset) == [Prompt(text="hello"), Prompt(text="world")]


def test_load_dataset_without_prompt_column():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"question": ["hello"]})

    with pytest.raises(PromptError, match="no 'prompt' column"):
        load_prompts(dataset)


def test_load_limit_keeps_first_prompts(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": word}) for word in ["a", "b", "c"]])

    assert load_prompts(path, limit=2) == [Prompt(text="a"), Prompt(text="b")]
    assert load_prompts(["a", "b", "c"], limit=1) == [Prompt(text="a")]
    assert load_prompts(["a"], limit=5) == [Prompt(text="a")]


def test_load_limit_skips_later_lines(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "a"}), "{not json"])

    assert load_prompts(path, limit=1) == [Prompt(text="a")]


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_load_invalid_limit(limit):
    with pytest.raises(PromptError, match="limit must be a positive integer"):
        load_prompts(["a"], limit=limit)


# Loading errors

def test_missing_file_names_path_and_list_hint(tmp_path):
    path = tmp_path / "absent.jsonl"

    with pytest.raises(PromptError) as excinfo:
        load_prompts(str(path))

    message = str(excinfo.value)
    assert str(path) in message
    assert "was not found" in message
    assert "list" in message


def test_literal_string_is_read_as_path():
    with pytest.raises(PromptError, match="was not found"):
        load_prompts("What is the capital of France?")


def test_empty_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n  \n", encoding="utf-8")

    with pytest.raises(PromptError, match="is empty"):
        load_prompts(path)


def test_json_file_with_empty_list(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text("[]", encoding="utf-8")

    with pytest.raises(PromptError, match="No prompts found") as excinfo:
        load_prompts(path)

    assert str(path) in str(excinfo.value)


def test_empty_list_source():
    with pytest.raises(PromptError, match="No prompts found"):
        load_prompts([])


def test_unsupported_extension(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n", encoding="utf-8")

    with pytest.raises(PromptError, match=r"expected \.json or \.jsonl"):
        load_prompts(path)


def test_malformed_jsonl_names_line(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "a"}), "", '{"prompt": "b"'])

    with pytest.raises(PromptError, match="Malformed JSON") as excinfo:
        load_prompts(path)

    assert f"{str(path)!r}, line 3" in str(excinfo.value)


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]', encoding="utf-8")

    with pytest.raises(PromptError, match="line 3"):
        load_prompts(path)


def test_json_file_not_a_list(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('{"prompt": "a"}', encoding="utf-8")

    with pytest.raises(PromptError, match="must contain a JSON list"):
        load_prompts(path)


def test_object_without_prompt_names_line(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "a"}), json.dumps({"question": "b"})])

    with pytest.raises(PromptError, match="no 'prompt' field") as excinfo:
        load_prompts(path)

    assert "line 2" in str(excinfo.value)


def test_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", ['"hello"'])

    with pytest.raises(PromptError, match="line 1: expected an object"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("", "Empty prompt"),
        ("   ", "Empty prompt"),
        ([], "Empty conversation"),
        (42, "expected a string or a list of role/content messages"),
        (None, "expected a string or a list of role/content messages"),
    ],
)
def test_invalid_prompt_value_names_line(tmp_path, prompt, expected):
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": prompt})])

    with pytest.raises(PromptError, match=expected) as excinfo:
        load_prompts(path)

    assert "line 1" in str(excinfo.value)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"content": "hello"}, "'role' field is missing"),
        ({"role": "user"}, "'content' field is missing"),
        ({"role": "user", "content": ["hello"]}, "'content' must be a string"),
        ({"role": "", "content": "hello"}, "'role' is empty"),
        ("hello", "expected an object with 'role' and 'content'"),
    ],
)
def test_invalid_message(tmp_path, message, expected):
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": [message]})])

    with pytest.raises(PromptError, match=expected) as excinfo:
        load_prompts(path)

    assert "line 1" in str(excinfo.value)


def test_bare_conversation_as_source():
    with pytest.raises(PromptError, match="single chat message"):
        load_prompts(CONVERSATION)


def test_unsupported_source_type():
    with pytest.raises(PromptError, match="Unsupported prompt source"):
        load_prompts(42)


def test_prompt_needs_text_or_messages():
    with pytest.raises(PromptError, match="exactly one"):
        Prompt()
    with pytest.raises(PromptError, match="exactly one"):
        Prompt(text="a", messages=({"role": "user", "content": "b"},))


# Encoding

def test_encode_plain_text_adds_special_tokens():
    tokenizer = make_tokenizer(chat_template=None)
    prompts = [Prompt(text="hello world"), Prompt(messages=tuple(CONVERSATION))]

    encoded = encode_prompts(tokenizer, prompts, use_chat_template=False, max_new_tokens=4, context_length=None)

    assert encoded[0] == ids("<s>", "hello", "world")
    assert encoded[1] == ids("<s>", "be", "brief", "how", "are", "you", "?")


def test_encode_chat_adds_no_special_tokens():
    tokenizer = make_tokenizer()
    prompts = [Prompt(text="hello world"), Prompt(messages=tuple(CONVERSATION))]

    encoded = encode_prompts(tokenizer, prompts, use_chat_template=True, max_new_tokens=4, context_length=None)

    assert encoded[0] == ids("<|im_start|>", "user", "hello", "world", "<|im_end|>", "<|im_start|>", "assistant")
    assert encoded[1] == ids(
        "<|im_start|>", "system", "be", "brief", "<|im_end|>",
        "<|im_start|>", "user", "how", "are", "you", "?", "<|im_end|>",
        "<|im_start|>", "assistant",
    )


def test_encode_chat_flag_off_ignores_template():
    tokenizer = make_tokenizer()

    encoded = encode_prompts(
        tokenizer, [Prompt(text="hello")], use_chat_template=False, max_new_tokens=1, context_length=None
    )

    assert encoded == [ids("<s>", "hello")]


def test_encode_without_template_warns_and_falls_back(caplog):
    tokenizer = make_tokenizer(chat_template=None)

    with caplog.at_level(logging.WARNING, logger="canopy_monitor.prompts"):
        encoded = encode_prompts(
            tokenizer, [Prompt(text="hello"), Prompt(text="world")], use_chat_template=True,
            max_new_tokens=1, context_length=None,
        )

    assert encoded == [ids("<s>", "hello"), ids("<s>", "world")]
    warnings = [record for record in caplog.records if "no chat template" in record.getMessage()]
    assert len(warnings) == 1


def test_encode_context_length_boundary():
    tokenizer = make_tokenizer(chat_template=None)
    prompts = [Prompt(text="hello world")]  # 3 tokens with <s>

    encoded = encode_prompts(tokenizer, prompts, use_chat_template=False, max_new_tokens=5, context_length=8)

    assert encoded == [ids("<s>", "hello", "world")]


def test_encode_too_long_prompt_names_details():
    tokenizer = make_tokenizer(chat_template=None)
    prompts = [Prompt(text="hello"), Prompt(text="how are you ? " * 20)]

    with pytest.raises(PromptError) as excinfo:
        encode_prompts(tokenizer, prompts, use_chat_template=False, max_new_tokens=16, context_length=64)

    message = str(excinfo.value)
    assert "Prompt 1" in message
    assert "'how are you ? how are you ?" in message
    assert "81 prompt tokens" in message
    assert "max_new_tokens=16" in message
    assert "context length of 64" in message
    assert "shorter prompt or a smaller max_new_tokens" in message


def test_encode_zero_tokens():
    # A tokenizer without a post-processor adds nothing, and a whitespace prompt has no words.
    tokenizer = make_tokenizer(chat_template=None)
    tokenizer.backend_tokenizer.post_processor = None

    with pytest.raises(PromptError, match="zero tokens"):
        encode_prompts(
            tokenizer, [Prompt(text=" \t")], use_chat_template=False, max_new_tokens=1, context_length=None
        )


def test_encode_template_error_names_prompt():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}x"
    tokenizer = make_tokenizer(chat_template=template)

    with pytest.raises(PromptError, match="rejected prompt 0.*first message must be user"):
        encode_prompts(
            tokenizer, [Prompt(messages=tuple(CONVERSATION))], use_chat_template=True,
            max_new_tokens=1, context_length=None,
        )


def test_encode_invalid_max_new_tokens():
    with pytest.raises(PromptError, match="max_new_tokens"):
        encode_prompts(make_tokenizer(), [Prompt(text="hello")], use_chat_template=True, max_new_tokens=0,
                       context_length=None)


# Context length

def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    settings.update(overrides)
    return LlamaConfig(**settings)


def test_context_length_from_config():
    assert model_context_length(tiny_llama_config()) == 256


def test_context_length_from_model_and_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=128))
    assert model_context_length(model) == 128

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_context_length(peft_model) == 128


def test_context_length_gpt2_style_config():
    from transformers import GPT2Config

    assert model_context_length(GPT2Config(n_positions=96, n_embd=32, n_layer=1, n_head=2)) == 96


def test_context_length_uses_text_config():
    from transformers import LlavaConfig

    config = LlavaConfig(text_config=tiny_llama_config(max_position_embeddings=512).to_dict())

    assert model_context_length(config) == 512


def test_context_length_unknown():
    class Config:
        hidden_size = 8

    assert model_context_length(Config()) is None
