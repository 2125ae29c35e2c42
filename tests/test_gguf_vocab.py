"""The tokenizer metadata we write, read back by a real llama.cpp (vocab-only GGUFs).

Three real tokenizers: Mixtral's SentencePiece model (reference: SentencePiece itself; the
transformers 5 tokenizer for it differs, see FINDINGS), Qwen3's byte-level BPE tokenizer.json
and SmolLM2's (rebuilt from its GGUF) with the `tokenizers` library as reference. Where the
llama.cpp source is unpacked, its own converter's output is compared key by key.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
from assets import asset, mixtral_tokenizer_folder, qwen3_tokenizer_folder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mlxmoe.errors import MlxMoeError
from mlxmoe.gguf.llamacpp import open_gguf
from mlxmoe.gguf.vocab import TokenizerError, add_tokenizer

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
LLAMA_CPP_SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it? I'VE "
    "been 'told he's there, 'RE you sure?",
    "code": "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    "\n\nclass A:\n\tdef __init__(self):  # tab-indented\n\t\tself.x = {'a': [1, 2]}\n",
    "cjk": "我想在苹果公司工作。日本語のテキストも読めます。한국어 문장도 있습니다。",
    "emoji": "🚀 launch 😶‍🌫️ ✅ 🦙🦙 👩‍👩‍👧‍👦 ok👍🏽",
    "numbers": "3 33 333 3333 33333 333333 3.14159 1,000,000 2024-11-22 0x1F -42 1e-5",
    "whitespace": "  two leading\n\n\nthree newlines\t\ttabs   three   spaces  \n \n trailing   ",
    "punctuation": "------======= ''''''```````\"\"\"\"......!!!!!!?????? a'lL (x) [y] {z}",
    "mixed": "Résumé: naïve café — “quotes” and Български текст, Ελληνικά, עברית.",
}
CHAT = {  # text with special tokens, as a chat template renders it
    "mixtral": "<s>[INST] What is your favourite condiment? [/INST]Well, I'm quite partial to "
    "lemon.</s>[INST] Do you have mayonnaise recipes? [/INST]",
    "qwen3": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n",
    "smollm2": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
}
GGUF_SPECIAL_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
}


@dataclass
class Case:
    name: str
    folder: Path
    gguf: Path
    llama: object  # llama_cpp.Llama over the vocab-only GGUF
    reference: Tokenizer | sentencepiece.SentencePieceProcessor

    def reference_ids(self, text: str) -> list[int]:
        """What the reference gives ``text`` with its special tokens (added as by default)."""
        if isinstance(self.reference, Tokenizer):
            return self.reference.encode(text).ids
        # SentencePiece parses no special tokens: split on them, encode each piece, as the
        # Mistral/Llama tokenizers do; BOS in front, as their tokenizer_config says.
        specials = {"<s>": 1, "</s>": 2, **added_tokens(self.folder)}
        ids, rest = [self.reference.bos_id()], text
        while rest:
            at = [(rest.find(s), s) for s in specials if s in rest]
            cut, special = min(at) if at else (len(rest), None)
            ids += self.reference.encode(rest[:cut]) if cut else []
            if special is None:
                break
            ids.append(specials[special])
            rest = rest[cut + len(special) :]
        return ids

    def token_id(self, text: str) -> int:
        if isinstance(self.reference, Tokenizer):
            return self.reference.token_to_id(text)
        return self.reference.piece_to_id(text)

    def llama_cpp_ids(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=True, special=True)


def added_tokens(folder: Path) -> dict[str, int]:
    spec = json.loads((folder / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in spec["added_tokens"] if t["id"] >= 32000}


def write_vocab_gguf(folder: Path, arch: str, path: Path) -> str:
    """A vocab-only GGUF, laid out as the converter's ``--vocab-only`` writes it."""
    writer = gguf.GGUFWriter(path, arch)
    kind = add_tokenizer(writer, folder)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return kind


def mixtral_folder(folder: Path) -> Path:
    mixtral_tokenizer_folder(folder)
    shutil.copy(CONFIGS / "mixtral-8x7b.json", folder / "config.json")
    return folder


def qwen3_folder(folder: Path) -> Path:
    qwen3_tokenizer_folder(folder)
    shutil.copy(CONFIGS / "qwen3-30b-a3b.json", folder / "config.json")
    return folder


TOKENIZERS = {  # name: (tokenizer folder writer, GGUF architecture)
    "mixtral": (mixtral_folder, "llama"),
    "qwen3": (qwen3_folder, "qwen3moe"),
    "smollm2": (None, "llama"),  # the session's SmolLM2 folder, rebuilt from its real GGUF
}


# SmolLM2's folder is the session's conversion of the real GGUF: the fast loop leaves it out.
@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n == "smollm2" else n for n in TOKENIZERS],
)
def case(request, tmp_path_factory):
    make_folder, arch = TOKENIZERS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    folder = make_folder(tmp / "hf") if make_folder else request.getfixturevalue("smollm2_hf")
    if (folder / "tokenizer.model").is_file():
        reference = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    else:
        reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    path = tmp / "vocab.gguf"
    kind = write_vocab_gguf(folder, arch, path)
    assert kind == ("gpt2" if isinstance(reference, Tokenizer) else "llama")
    with open_gguf(path, vocab_only=True) as llama:
        yield Case(request.param, folder, path, llama, reference)


@pytest.mark.parametrize("sample", SAMPLES)
def test_llama_cpp_tokenizes_plain_text_like_the_reference(case, sample):
    text = SAMPLES[sample]
    assert case.llama_cpp_ids(text) == case.reference_ids(text)


def test_llama_cpp_tokenizes_special_tokens_like_the_reference(case):
    ids = case.llama_cpp_ids(CHAT[case.name])
    assert ids == case.reference_ids(CHAT[case.name])
    assert case.llama.token_eos() in ids  # </s>, <|im_end|>: one token each


def test_token_list_equals_the_reference_padded_to_the_config_vocab_size(case):
    config = json.loads((case.folder / "config.json").read_text())
    n = case.llama.n_vocab()
    assert n == config["vocab_size"]
    if isinstance(case.reference, Tokenizer):
        size = case.reference.get_vocab_size(with_added_tokens=True)
        expected = [case.reference.id_to_token(i) for i in range(size)]
    else:
        expected = [case.reference.id_to_piece(i) for i in range(case.reference.get_piece_size())]
    expected += [f"[PAD{i}]" for i in range(len(expected), n)]
    assert [case.llama._model.token_get_text(i) for i in range(n)] == expected


def test_special_ids_and_add_bos_are_those_the_hf_config_declares(case):
    config = json.loads((case.folder / "config.json").read_text())
    tokenizer_config = json.loads((case.folder / "tokenizer_config.json").read_text())
    for kind, key in GGUF_SPECIAL_KEYS.items():
        text = tokenizer_config.get(f"{kind}_token")  # as transformers resolves them
        expected = case.token_id(text) if text else config.get(f"{kind}_token_id")
        written = case.llama.metadata.get(f"tokenizer.ggml.{key}")
        assert written == (None if expected is None else str(expected)), kind
    assert str(case.llama.token_bos()) == case.llama.metadata["tokenizer.ggml.bos_token_id"]
    assert str(case.llama.token_eos()) == case.llama.metadata["tokenizer.ggml.eos_token_id"]
    adds_bos = case.llama.tokenize(b"hello", add_bos=True)[0] == case.llama.token_bos()
    assert adds_bos == tokenizer_config["add_bos_token"]  # Mixtral True, Qwen3/SmolLM2 False


def test_chat_template_round_trips(case):
    tokenizer_config = json.loads((case.folder / "tokenizer_config.json").read_text())
    jinja = case.folder / "chat_template.jinja"
    expected = tokenizer_config.get("chat_template") or jinja.read_text()
    assert "{%" in expected
    assert case.llama.metadata["tokenizer.chat_template"] == expected


def test_a_vocab_only_gguf_needs_only_the_architecture_and_tokenizer_keys(case):
    keys = set(gguf_kv(case.gguf))
    assert {k for k in keys if not k.startswith("tokenizer.")} == {"general.architecture"}


@pytest.mark.slow
@pytest.mark.proof("converter")
@pytest.mark.skipif(
    not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file(),
    reason=f"llama.cpp's converter is not unpacked at {LLAMA_CPP_SRC} (LLAMA_CPP_SRC)",
)
def test_metadata_equals_llama_cpps_own_converter_output(case, tmp_path):
    reference = tmp_path / "converter.gguf"
    subprocess.run(
        [
            sys.executable,
            "convert_hf_to_gguf.py",
            "--vocab-only",
            "--outfile",
            str(reference),
            str(case.folder),
        ],
        cwd=LLAMA_CPP_SRC,
        check=True,
        capture_output=True,
    )
    ours, theirs = tokenizer_kv(case.gguf), tokenizer_kv(reference)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []  # same value types and bytes


def test_sentencepiece_token_types_follow_the_models_piece_kinds(tmp_path):
    folder = mixtral_folder(tmp_path / "hf")
    write_vocab_gguf(folder, "llama", tmp_path / "vocab.gguf")
    spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    T = gguf.TokenType
    expected = [
        T.UNKNOWN
        if spm.is_unknown(i)
        else T.CONTROL
        if spm.is_control(i)
        else T.BYTE
        if spm.is_byte(i)
        else T.NORMAL
        for i in range(spm.get_piece_size())
    ]
    assert gguf_array(tmp_path / "vocab.gguf", "tokenizer.ggml.token_type").tolist() == expected
    scores = gguf_array(tmp_path / "vocab.gguf", "tokenizer.ggml.scores")
    assert scores.tolist() == pytest.approx([spm.get_score(i) for i in range(spm.get_piece_size())])


def test_sentencepiece_added_tokens_from_tokenizer_json_are_single_tokens(tmp_path):
    """transformers 5 keeps tokens added to a SentencePiece model only in tokenizer.json."""
    folder = mixtral_folder(tmp_path / "hf")
    spec = json.loads((folder / "tokenizer.json").read_text())
    for i, text in ((32000, "<|im_start|>"), (32001, "<|im_end|>")):
        spec["added_tokens"].append(
            {
                "id": i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 32002}))
    write_vocab_gguf(folder, "llama", tmp_path / "vocab.gguf")
    assert (
        gguf_array(tmp_path / "vocab.gguf", "tokenizer.ggml.token_type")[32000:].tolist()
        == [gguf.TokenType.CONTROL] * 2
    )
    spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = "<|im_start|>user\nhi there<|im_end|>"
    with open_gguf(tmp_path / "vocab.gguf", vocab_only=True) as llama:
        case = Case("mixtral+chatml", folder, tmp_path / "vocab.gguf", llama, spm)
        assert case.llama_cpp_ids(text)[:2] == [1, 32000]
        assert case.llama_cpp_ids(text) == case.reference_ids(text)


@pytest.mark.parametrize("case", ["qwen3"], indirect=True)
def test_qwen3_added_tokens_are_control_unless_plain_markup(case):
    types = gguf_array(case.gguf, "tokenizer.ggml.token_type")
    T = gguf.TokenType
    # <think> is added with special=false in Qwen3's tokenizer.json: user-defined in llama.cpp
    ids = [case.token_id(t) for t in ("<|im_start|>", "<think>", "Hello")] + [151935]
    assert types[ids].tolist() == [T.CONTROL, T.USER_DEFINED, T.NORMAL, T.UNUSED]
    assert case.llama.metadata["tokenizer.ggml.pre"] == "qwen2"


def test_a_bare_sentencepiece_folder_gets_the_models_own_special_ids(tmp_path):
    """Only tokenizer.model, a chat_template.jinja and a generation_config.json: the gaps
    gguf-py's SpecialVocab leaves are filled from them and from the SentencePiece model."""
    model = asset("mistral_common", "data/tokenizer.model.v1")
    shutil.copy(model, tmp_path / "tokenizer.model")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    write_vocab_gguf(tmp_path, "llama", tmp_path / "vocab.gguf")
    spm = sentencepiece.SentencePieceProcessor(model_file=str(model))
    with open_gguf(tmp_path / "vocab.gguf", vocab_only=True) as llama:
        meta = llama.metadata
        assert [
            meta[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id", "unknown_token_id")
        ] == [str(spm.bos_id()), str(spm.eos_id()), str(spm.unk_id())]
        assert "tokenizer.ggml.padding_token_id" not in meta  # the model has no pad piece
        assert meta["tokenizer.chat_template"] == (tmp_path / "chat_template.jinja").read_text()
        text = SAMPLES["code"]
        assert llama.tokenize(text.encode(), add_bos=True) == [spm.bos_id(), *spm.encode(text)]


# --- refusals ------------------------------------------------------------------------------


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    shutil.copy(CONFIGS / "mixtral-8x7b.json", tmp_path / "config.json")
    with pytest.raises(TokenizerError, match=r"no tokenizer found.*tokenizer\.model.*tokenizer\.json"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)


@pytest.mark.slow
def test_an_unknown_pre_tokenizer_is_refused_naming_the_file(smollm2_hf, tmp_path):
    """SmolLM2's real vocabulary without GPT-2's word splitting: llama.cpp's "smollm" would
    split text differently, so the hash no longer matches and nothing is written."""
    spec = json.loads((smollm2_hf / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][-1]["use_regex"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: unknown BPE pre-tokenizer"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)


def test_unsupported_tokenizer_kinds_are_refused(tmp_path):
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MlxMoeError, match=r"tokenizer\.json: a WordPiece tokenizer"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)

    metaspace = Tokenizer(models.BPE({"a": 0, "▁": 1}, []))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    metaspace.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="without byte-level pre-tokenization"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)


def test_a_sentencepiece_unigram_model_is_refused(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=30,
        model_type="unigram",
        minloglevel=2,
    )
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: a SentencePiece UNIGRAM model"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)


def test_corrupt_files_are_refused_naming_them(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a SentencePiece model"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)
    shutil.copy(asset("mistral_common", "data/tokenizer.model.v1"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": tru')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path)


# --- helpers -------------------------------------------------------------------------------


@cache
def gguf_kv(path: Path) -> dict[str, tuple[int, bytes]]:
    """Each key's GGUF value type and raw value bytes, read straight from the file (gguf-py's
    GGUFReader spends seconds on a 150k-token vocabulary; this, a fraction of one)."""
    data = path.read_bytes()
    sizes = {t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
    STRING, ARRAY = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY

    def skip(value_type: int, at: int, count: int = 1) -> int:
        if value_type != STRING:
            return at + sizes[value_type] * count
        for _ in range(count):
            at += 8 + struct.unpack_from("<Q", data, at)[0]
        return at

    assert data[:4] == b"GGUF"
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    at, kv = 24, {}
    for _ in range(n_kv):
        (key_len,) = struct.unpack_from("<Q", data, at)
        key, at = data[at + 8 : at + 8 + key_len].decode(), at + 8 + key_len
        (value_type,) = struct.unpack_from("<I", data, at)
        start = at = at + 4
        if value_type == ARRAY:
            item_type, count = struct.unpack_from("<IQ", data, at)
            at = skip(item_type, at + 12, count)
        else:
            at = skip(value_type, at)
        kv[key] = (value_type, data[start:at])
    return kv


def tokenizer_kv(path: Path) -> dict[str, tuple[int, bytes]]:
    return {k: v for k, v in gguf_kv(path).items() if k.startswith("tokenizer.")}


def gguf_array(path: Path, key: str) -> np.ndarray:
    """A numeric array value (token types, scores)."""
    value_type, raw = gguf_kv(path)[key]
    item_type, count = struct.unpack_from("<IQ", raw)
    assert value_type == gguf.GGUFValueType.ARRAY
    return np.frombuffer(raw, gguf.GGUFReader.gguf_scalar_to_np[item_type], count, offset=12)


@pytest.mark.parametrize("name", ["mixtral", "qwen3"])
def test_our_writer_packs_the_metadata_byte_for_byte_as_gguf_py(name, tmp_path):
    from mlxmoe.gguf.writer import GGUFWriter

    folder, arch = TOKENIZERS[name]
    folder = folder(tmp_path / "tokenizer")
    files = {}
    for cls in (gguf.GGUFWriter, GGUFWriter):
        files[cls] = tmp_path / f"{cls.__module__}.gguf"
        writer = cls(files[cls], arch)
        add_tokenizer(writer, folder)  # strings, merges, float scores, int types, bools
        writer.add_array("test.mixed_widths", [0.5, -2.25, 1e-8])
        writer.add_key_value(
            "test.u64", [1, 2**40], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64
        )
        writer.add_array("test.bytes", [b"a\x00b", "é"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
    ours, theirs = files[GGUFWriter].read_bytes(), files[gguf.GGUFWriter].read_bytes()
    assert len(ours) > 1_000_000 if name == "qwen3" else len(ours) > 400_000
    assert ours == theirs
    with open_gguf(files[GGUFWriter], vocab_only=True) as llama:  # and llama.cpp reads it
        ids = llama.tokenize(SAMPLES["code"].encode(), add_bos=False, special=False)
        prefix = " " if name == "mixtral" else ""  # SentencePiece's add_space_prefix
        assert llama.detokenize(ids).decode() == prefix + SAMPLES["code"]


def test_our_writer_refuses_a_mixed_array_as_gguf_py_does(tmp_path):
    from mlxmoe.gguf.writer import GGUFWriter

    writer = GGUFWriter(tmp_path / "x.gguf", "llama")
    writer.add_array("test.mixed", [1, "two"])
    writer.write_header_to_file()
    with pytest.raises(ValueError, match="same type"):
        writer.write_kv_data_to_file()
