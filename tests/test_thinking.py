"""Thinking models (`data.thinking`): the tokens trained and their loss mask with reasoning
dropped (off) or kept (keep), checked by decoding Qwen3's real tokenizer against its real chat
template with enable_thinking; the recipe key and its way to the tokenizing child; and the
non-thinking prompt that `mlxmoe eval` and the demo's llama.cpp answer use."""

from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import transformers
from assets import MIXTRAL_TEMPLATE, asset, qwen3_tokenizer_folder, sentencepiece_bpe
from chat_checks import before_last_answer, trained
from chat_checks import example as chat_example

from mlxmoe.data import DataError, load_dataset
from mlxmoe.errors import MlxMoeError
from mlxmoe.recipe import RecipeError, load_recipe

EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3's mark of an answer without reasoning
QUESTION = {"role": "user", "content": "What is 2+2?"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
ANSWER = {"role": "assistant", "content": "4."}
REASONED = {**ANSWER, "reasoning_content": "Two and two make four."}
THINK_BLOCK = {**ANSWER, "content": "<think>\nTwo and two make four.\n</think>\n\n4."}


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> Path:
    qwen3_tokenizer_folder(folder := tmp_path_factory.mktemp("qwen3"))
    return folder


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_folder):
    return transformers.AutoTokenizer.from_pretrained(qwen3_folder)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def rendered(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, **kwargs))


def example(tmp_path: Path, tokenizer, messages: list[dict], thinking: str):
    return chat_example(tmp_path, tokenizer, messages, thinking, max_seq_len=512)


# --- off: every answer after the non-thinking prompt ----------------------------------------


def test_off_trains_the_answer_after_the_non_thinking_prompt_and_not_the_empty_block(
    tmp_path, qwen3_tokenizer
):
    ex = example(tmp_path, qwen3_tokenizer, [QUESTION, ANSWER], "off")
    # The tokens are the template's own rendering of the sample: the empty block included ...
    assert ex.tokens.tolist() == rendered(qwen3_tokenizer, [QUESTION, ANSWER])
    assert qwen3_tokenizer.decode(ex.tokens).endswith(f"<|im_start|>assistant\n{EMPTY_THINK}4.<|im_end|>\n")
    # ... but it is prompt: the answer and its end of turn are trained, the newline after is not.
    assert trained(qwen3_tokenizer, ex) == ["4.<|im_end|>"]
    assert before_last_answer(ex) == rendered(
        qwen3_tokenizer, [QUESTION], add_generation_prompt=True, enable_thinking=False
    )


@pytest.mark.parametrize("answer", [REASONED, THINK_BLOCK], ids=["reasoning_content", "think block"])
def test_off_drops_reasoning_given_in_the_data(answer, tmp_path, qwen3_tokenizer):
    plain = example(tmp_path, qwen3_tokenizer, [QUESTION, ANSWER], "off")
    ex = example(tmp_path, qwen3_tokenizer, [QUESTION, answer], "off")
    np.testing.assert_array_equal(ex.tokens, plain.tokens)
    np.testing.assert_array_equal(ex.loss_mask, plain.loss_mask)


def test_off_multi_turn_trains_every_answer_as_the_template_renders_the_conversation(
    tmp_path, qwen3_tokenizer
):
    conversation = [QUESTION, REASONED, FOLLOW_UP, {"role": "assistant", "content": "6."}]
    ex = example(tmp_path, qwen3_tokenizer, conversation, "off")
    assert ex.tokens.tolist() == rendered(qwen3_tokenizer, [QUESTION, ANSWER, *conversation[2:]])
    # Qwen3 writes earlier answers without a think block and the last with the empty one.
    assert trained(qwen3_tokenizer, ex) == ["4.<|im_end|>", "6.<|im_end|>"]
    assert before_last_answer(ex) == rendered(
        qwen3_tokenizer, [QUESTION, ANSWER, FOLLOW_UP], add_generation_prompt=True, enable_thinking=False
    )


# --- keep: reasoning trained after the thinking prompt ----------------------------------------


@pytest.mark.parametrize("answer", [REASONED, THINK_BLOCK], ids=["reasoning_content", "think block"])
def test_keep_trains_the_think_block_after_the_thinking_prompt(answer, tmp_path, qwen3_tokenizer):
    ex = example(tmp_path, qwen3_tokenizer, [QUESTION, answer], "keep")
    assert ex.tokens.tolist() == rendered(qwen3_tokenizer, [QUESTION, REASONED])
    assert trained(qwen3_tokenizer, ex) == ["<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"]
    assert before_last_answer(ex) == rendered(
        qwen3_tokenizer, [QUESTION], add_generation_prompt=True, enable_thinking=True
    )


def test_keep_trains_an_answer_without_reasoning_as_off_does(tmp_path, qwen3_tokenizer):
    kept = example(tmp_path, qwen3_tokenizer, [QUESTION, ANSWER], "keep")
    off = example(tmp_path, qwen3_tokenizer, [QUESTION, ANSWER], "off")
    np.testing.assert_array_equal(kept.tokens, off.tokens)
    np.testing.assert_array_equal(kept.loss_mask, off.loss_mask)


def test_keep_multi_turn_trains_the_reasoning_the_template_writes(tmp_path, qwen3_tokenizer):
    last = {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."}
    ex = example(tmp_path, qwen3_tokenizer, [QUESTION, REASONED, FOLLOW_UP, last], "keep")
    # Qwen3's template drops the reasoning of answers before the last question.
    assert ex.tokens.tolist() == rendered(qwen3_tokenizer, [QUESTION, REASONED, FOLLOW_UP, last])
    assert trained(qwen3_tokenizer, ex) == [
        "4.<|im_end|>",
        "<think>\nThree and three.\n</think>\n\n6.<|im_end|>",
    ]


def test_a_template_without_a_thinking_mode_trains_the_same_tokens_either_way(tmp_path):
    mixtral = sentencepiece_bpe(asset("mistral_common", "data/tokenizer.model.v1"), MIXTRAL_TEMPLATE)
    off = example(tmp_path, mixtral, [QUESTION, REASONED], "off")
    kept = example(tmp_path, mixtral, [QUESTION, REASONED], "keep")
    np.testing.assert_array_equal(off.tokens, kept.tokens)
    np.testing.assert_array_equal(off.loss_mask, kept.loss_mask)
    assert trained(mixtral, off) == ["4.</s>"]


def test_bad_reasoning_and_an_unknown_mode_are_one_error(tmp_path, qwen3_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [QUESTION, {**ANSWER, "reasoning_content": 4}]}) + "\n")
    with pytest.raises(
        DataError,
        match=r'train\.jsonl:1: messages\[1\] "reasoning_content" must '
        "be a string",
    ):
        load_dataset(path, qwen3_tokenizer, 64)
    with pytest.raises(MlxMoeError, match="data.thinking must be one of off, keep, got 'on'"):
        load_dataset(path, qwen3_tokenizer, 64, thinking="on")


# --- the recipe key, and its way to the tokenizing child ---------------------------------------


def test_recipe_data_is_a_path_or_a_section_with_thinking(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: data/faq\n")
    assert (load_recipe(recipe).data.path, load_recipe(recipe).data.thinking) == ("data/faq", "off")
    recipe.write_text("data:\n  path: data/faq\n  thinking: keep\n")
    loaded = load_recipe(recipe)
    assert (loaded.data.path, loaded.data.thinking) == ("data/faq", "keep")
    loaded.data = tmp_path / "other"  # a path for data (the --data flag) keeps the rest
    assert (loaded.data.path, loaded.data.thinking) == (str(tmp_path / "other"), "keep")
    recipe.write_text("data:\n  thinking: off\n")  # YAML 1.1 reads a bare off as false
    assert load_recipe(recipe).data.thinking == "off"
    recipe.write_text("data:\n")
    assert (load_recipe(recipe).data.path, load_recipe(recipe).data.thinking) == (None, "off")


@pytest.mark.parametrize(
    ("yaml", "error"),
    [
        ("data:\n  thinking: maybe\n", "data.thinking must be one of off, keep, got 'maybe'"),
        ("data:\n  thinking: on\n", "data.thinking must be one of off, keep, got True"),
        ("data:\n  think: keep\n", r"recipe\.yaml\.data: unknown key 'think' \(known: path, thinking\)"),
    ],
)
def test_a_bad_data_thinking_is_one_error_naming_the_key(yaml, error, tmp_path):
    (recipe := tmp_path / "recipe.yaml").write_text(yaml)
    with pytest.raises(RecipeError, match=error):
        load_recipe(recipe)


@pytest.mark.slow
def test_the_tokenizing_child_process_receives_the_thinking_mode(tmp_path, qwen3_folder, qwen3_tokenizer):
    from mlxmoe.data.tokenize_worker import tokenize_files

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [QUESTION, REASONED]}) + "\n")
    for mode in ("off", "keep"):
        (child,) = tokenize_files(qwen3_folder, [path], 512, True, mode)
        here = load_dataset(path, qwen3_tokenizer, 512, True, mode)
        np.testing.assert_array_equal(child.examples[0].tokens, here.examples[0].tokens)
        np.testing.assert_array_equal(child.examples[0].loss_mask, here.examples[0].loss_mask)
    assert "<think>\nTwo" in qwen3_tokenizer.decode(child.examples[0].tokens)  # keep, the last one


def test_training_tokenizes_with_the_recipes_thinking_mode(tmp_path, monkeypatch):
    import mlxmoe.train.loop as loop

    class Stop(Exception):
        pass

    def tokenize_job(*args):
        seen.extend(args)
        raise Stop

    seen: list = []
    monkeypatch.setattr(loop, "TokenizeJob", tokenize_job)
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    recipe = load_recipe(None, data={"thinking": "keep"})
    recipe.model, recipe.data = str(tmp_path), str(tmp_path)
    with pytest.raises(Stop):
        loop.train(recipe, tmp_path / "run", show_progress=False)
    assert seen[-1] == "keep"


# --- the prompt evaluation and the demo answer after ---------------------------------------------


@pytest.mark.slow
def test_eval_generates_after_the_non_thinking_prompt_and_scores_the_answer_alone(
    tmp_path, qwen3_folder, qwen3_tokenizer, monkeypatch
):
    from tiny_models import make_hf_model, save

    from mlxmoe.evaluate import evaluate

    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (model / name).write_bytes((qwen3_folder / name).read_bytes())
    save(make_hf_model("qwen3_moe", vocab_size=151936), model)
    samples = [
        {"prompt": "What is 2+2?", "completion": "4."},
        {
            "messages": [
                FOLLOW_UP,
                {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."},
            ]
        },
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    generation = importlib.import_module("mlx_lm.generate")  # mlx_lm.generate is a function too
    prompts, stream_generate = [], generation.stream_generate

    def recording(model, tokenizer, prompt, **kwargs):
        prompts.append(np.array(prompt).tolist())
        yield from stream_generate(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(generation, "stream_generate", recording)
    report = evaluate(model, data, max_new_tokens=2, dtype="float32")
    assert prompts == [
        rendered(qwen3_tokenizer, [q], add_generation_prompt=True, enable_thinking=False)
        for q in (QUESTION, FOLLOW_UP)
    ]
    assert [r.reference for r in report.per_sample] == ["4.", "6."]
    # Perplexity is of the answers and their end of turn: no think block, no reasoning.
    assert report.answer_tokens == len(ids(qwen3_tokenizer, "4.<|im_end|>")) + len(
        ids(qwen3_tokenizer, "6.<|im_end|>")
    )


def test_the_demo_asks_llama_cpp_with_the_non_thinking_prompt(
    tmp_path, qwen3_folder, qwen3_tokenizer, monkeypatch
):
    import mlxmoe.gguf.llamacpp
    from mlxmoe.demo import DemoSettings, _ask_llama_cpp

    calls = []

    class FakeLlama:
        def create_completion(self, prompt, **kwargs):
            calls.append((prompt, kwargs["stop"]))
            return {"choices": [{"text": " 4."}], "usage": {"completion_tokens": 2}}

    @contextmanager
    def open_gguf(path, **kwargs):
        yield FakeLlama()

    monkeypatch.setattr(mlxmoe.gguf.llamacpp, "open_gguf", open_gguf)
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "What is 2+2?", "completion": "4."}) + "\n")
    answer = _ask_llama_cpp(tmp_path / "model.gguf", qwen3_folder, tmp_path, DemoSettings())
    assert answer["answer"] == "4." and answer["rouge_l"] == 1.0
    expected = qwen3_tokenizer.apply_chat_template(
        [QUESTION], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert calls == [(expected, ["<|im_start|>", "<|im_end|>"])]
    assert expected.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
