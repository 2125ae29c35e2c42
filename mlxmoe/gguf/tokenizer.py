"""A Hugging Face tokenizer folder -> the ``tokenizer.ggml.*`` keys llama.cpp reads, as its
converter writes them (``_set_vocab_sentencepiece`` for SentencePiece, ``_set_vocab_gpt2``
for byte-level BPE), plus special tokens, add_bos/add_eos and the chat template through
gguf-py's own ``SpecialVocab``.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from ..errors import MlxMoeError

T = gguf.TokenType

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids its tokenizer gives this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); these are the entries for the tokenizers our
# families ship with, copied from that table.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}


class TokenizerExportError(MlxMoeError):
    pass


def _vocab_size(folder: Path, fallback: int) -> int:
    config = folder / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("vocab_size") or fallback)
    return fallback


def _looks_special(token: str) -> bool:
    # the converter's does_token_look_special, for the token shapes our families use
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<s>", "</s>", "<unk>", "<pad>")


def add_sentencepiece(writer: gguf.GGUFWriter, folder: Path) -> None:
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = _vocab_size(folder, spm.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [T.UNUSED] * n
    for i in range(min(spm.vocab_size(), n)):
        tokens[i] = spm.id_to_piece(i).encode()
        scores[i] = spm.get_score(i)
        types[i] = (T.UNKNOWN if spm.is_unknown(i) else T.CONTROL if spm.is_control(i)
                    else T.UNUSED if spm.is_unused(i) else T.BYTE if spm.is_byte(i) else T.NORMAL)
    config = folder / "tokenizer_config.json"
    added = json.loads(config.read_text()).get("added_tokens_decoder", {}) if config.is_file() else {}
    for key, data in added.items():
        i = int(key)
        if i < n and i >= spm.vocab_size():
            tokens[i] = data["content"].encode()
            scores[i] = -1000.0
            types[i] = T.CONTROL if data.get("special") or _looks_special(data["content"]) else T.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def add_bpe(writer: gguf.GGUFWriter, folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)  # never trust_remote_code
    vocab = tokenizer.get_vocab()
    n = _vocab_size(folder, len(vocab))
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in KNOWN_PRE:
        raise TokenizerExportError(
            f"{folder}: llama.cpp does not know this tokenizer's pre-tokenizer (hash {digest}); "
            f"supported: {', '.join(sorted(set(KNOWN_PRE.values())))}"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or _looks_special(token)
            types.append(T.CONTROL if special else T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(KNOWN_PRE[digest])
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def add_tokenizer(writer: gguf.GGUFWriter, folder: str | Path) -> str:
    """Write ``folder``'s tokenizer into ``writer``; returns the tokenizer model name."""
    folder = Path(folder)
    spm_file, hf_file = folder / "tokenizer.model", folder / "tokenizer.json"
    if spm_file.is_file():
        add_sentencepiece(writer, folder)
        kind, merges = "llama", False
    elif hf_file.is_file():
        model_type = json.loads(hf_file.read_text()).get("model", {}).get("type")
        if model_type != "BPE":
            raise TokenizerExportError(f"{hf_file}: tokenizer model {model_type!r} is not supported (BPE or SentencePiece)")
        add_bpe(writer, folder)
        kind, merges = "gpt2", True
    else:
        raise TokenizerExportError(f"{folder}: no tokenizer.model or tokenizer.json to export")
    special = gguf.SpecialVocab(folder, load_merges=merges)
    special.add_to_gguf(writer)
    return kind
