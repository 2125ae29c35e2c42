"""A Hugging Face tokenizer folder -> the ``tokenizer.ggml.*`` metadata llama.cpp tokenizes with.

What is written follows llama.cpp's own converter (``convert_hf_to_gguf.py``, whose vocabulary
code lives in ``conversion/base.py``), so llama.cpp splits text as if it had converted the model:

- a SentencePiece ``tokenizer.model`` -> ``tokenizer.ggml.model = "llama"``: every piece with
  its score and type (``_create_vocab_sentencepiece``), then the added tokens;
- a byte-level BPE ``tokenizer.json`` -> ``"gpt2"``: tokens, types and merges
  (``get_vocab_base`` / ``_set_vocab_gpt2``) and the pre-tokenizer name, which llama.cpp can
  only know by hashing the ids the tokenizer gives a fixed text (``get_vocab_base_pre``);
- for llama.cpp's ``gemma4`` arch, whatever the folder holds: ``tokenizer.json`` as
  ``"gemma4"`` (Gemma4Model.set_vocab in ``conversion/gemma.py``).

Special token ids, add_bos/add_eos, merges and the chat template come from gguf-py's
``SpecialVocab``, as in the converter; ``special_tokens_map.json``, ``generation_config.json``
and the SentencePiece model itself only fill ids the converter's sources left unset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from ..errors import MlxMoeError

logger = logging.getLogger(__name__)

T = gguf.TokenType
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILE = "tokenizer.json"
JSON_FILES = (
    "config.json",
    "tokenizer_config.json",
    TOKENIZER_FILE,
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "chat_template.json",
)

# The converter's pre-tokenizer check text (conversion/base.py, get_vocab_base_pre), verbatim.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(ids of CHECK_TEXT)) -> llama.cpp pre-tokenizer name: the entries of that same
# table for the tokenizers mlxmoe's families ship with (the hub repo each hash was taken from).
KNOWN_PRE_TOKENIZERS = {
    # Qwen/Qwen1.5-7B: Qwen1.5/Qwen2-MoE, Qwen2.5 and Qwen3(-MoE) share it
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    # Qwen/Qwen3-Embedding-0.6B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    # HuggingFaceTB/SmolLM-135M: SmolLM and SmolLM2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    # meta-llama/Meta-Llama-3-8B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    # allenai/OLMo-1.7-7B-hf, whose tokenizer OLMoE reuses
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    # Xenova/gpt-4o: o200k, which gpt-oss's tokenizer is (plus its harmony tokens)
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
}


# Gemma-4's markers the converter makes user-defined, so that llama.cpp prints them and its
# chat parser can read tool calls and thinking channels
GEMMA4_VISIBLE_TOKENS = frozenset(
    '<|channel> <channel|> <|tool_call> <tool_call|> <|tool_response> <tool_response|> <|"|>'.split()
)


class TokenizerError(MlxMoeError):
    """A tokenizer folder that cannot be written as llama.cpp metadata."""


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str] | list[bytes]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    add_space_prefix: bool | None = None
    builtin_ids: dict[str, int] | None = None  # ids the tokenizer model itself declares


def add_tokenizer(writer: gguf.GGUFWriter, model_folder: Path) -> str:
    """Write the tokenizer in ``model_folder`` as llama.cpp's ``tokenizer.ggml.*`` keys (and
    ``tokenizer.chat_template``) into ``writer``. Returns the ``tokenizer.ggml.model`` written:
    ``"llama"`` (SentencePiece), ``"gpt2"`` (byte-level BPE) or, for a ``gemma4`` writer,
    ``"gemma4"`` (the converter's vocabulary for that arch, whatever the folder holds)."""
    folder = Path(model_folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: no such model folder")
    files = {name: read_json(folder / name) for name in JSON_FILES}
    vocab_size = model_vocab_size(files["config.json"], folder / "config.json")
    if writer.arch == "gemma4":
        return add_gemma4_tokenizer(writer, folder, vocab_size)
    if (folder / SENTENCEPIECE_FILE).is_file():  # the converter tries SentencePiece first, too
        vocab = sentencepiece_vocab(folder, files, vocab_size)
    elif (folder / TOKENIZER_FILE).is_file():
        vocab = byte_level_bpe_vocab(folder / TOKENIZER_FILE, files, vocab_size)
    else:
        raise TokenizerError(
            f"{folder}: no tokenizer found (expected {SENTENCEPIECE_FILE} or {TOKENIZER_FILE})"
        )
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    special_vocab(folder, files, vocab).add_to_gguf(writer, quiet=True)
    return vocab.model


def add_gemma4_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int | None) -> str:
    """The converter's Gemma4Model.set_vocab: tokenizer.json (a SentencePiece vocabulary as
    byte-fallback BPE) read by gguf-py's LlamaHfVocab, every score -1000, Gemma-4's tool and
    channel markers user-defined so that llama.cpp renders them, merges from SpecialVocab,
    no pre-tokenizer name ("gemma4" implies its own)."""
    path = folder / TOKENIZER_FILE
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise TokenizerError(
            f"{path}: llama.cpp's gemma4 reads a byte-fallback BPE tokenizer.json ({exc})"
        ) from exc
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(T.USER_DEFINED if text.decode() in GEMMA4_VISIBLE_TOKENS else token_type)
    if vocab_size is not None and len(tokens) != vocab_size:
        # the converter would cut the embedding to the tokenizer; llama.cpp needs both equal
        raise TokenizerError(
            f"{path}: {len(tokens)} tokens, config.json's vocab_size is {vocab_size}; "
            "llama.cpp's gemma4 needs one embedding row per token"
        )
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    try:
        special = gguf.SpecialVocab(folder, load_merges=True)
    except ValueError as exc:
        raise TokenizerError(f"{folder}: gguf-py cannot read its special tokens ({exc})") from exc
    if not special.merges:
        raise TokenizerError(f"{path}: a BPE tokenizer without merges")
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(True)
    return "gemma4"


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def model_vocab_size(config: dict, path: Path) -> int | None:
    """The embedding's row count: the token list is padded to it, as the converter does."""
    size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise TokenizerError(f"{path}: vocab_size must be a positive integer, found {size!r}")
    return size


def looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``: added tokens that some tokenizers forget to
    mark special but llama.cpp must treat as control tokens."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def sentencepiece_vocab(folder: Path, files: dict[str, dict], vocab_size: int | None) -> Vocab:
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    path = folder / SENTENCEPIECE_FILE
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        spm = SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # protobuf's DecodeError, SentencePiece's RuntimeError
        raise TokenizerError(f"{path}: not a SentencePiece model ({exc})") from exc
    model_type = proto.trainer_spec.model_type
    if model_type != proto.trainer_spec.BPE:
        # llama.cpp's "llama" tokenizer merges pieces by score: SentencePiece's BPE algorithm
        kind = proto.trainer_spec.ModelType.Name(model_type)
        raise TokenizerError(f"{path}: a SentencePiece {kind} model; only BPE models are supported")

    n_pieces = spm.get_piece_size()
    n = vocab_size or n_pieces
    if n_pieces > n:
        logger.warning("%s: %d pieces but vocab_size %d; pieces from id %d are dropped", path, n_pieces, n, n)
    # unfilled ids (an embedding larger than the tokenizer) stay as the converter pads them
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [T.UNUSED] * n
    for i in range(min(n_pieces, n)):
        tokens[i] = spm.id_to_piece(i).encode()
        scores[i] = spm.get_score(i)
        types[i] = (
            T.UNKNOWN
            if spm.is_unknown(i)
            else T.CONTROL
            if spm.is_control(i)
            else T.UNUSED
            if spm.is_unused(i)
            else T.BYTE
            if spm.is_byte(i)
            else T.NORMAL
        )

    def add(token_id: int, text: str, token_type: int, source: str) -> None:
        if token_id >= n:
            logger.warning(
                "%s: added token %r has id %d, past vocab_size %d; ignored",
                folder / source,
                text,
                token_id,
                n,
            )
            return
        if token_type == T.USER_DEFINED:
            text = text.replace("\u2581", " ")  # llama.cpp expects user-defined spaces pre-normalized
        tokens[token_id], scores[token_id], types[token_id] = text.encode(), -1000.0, token_type

    # The converter's two sources, in its order: added_tokens.json, then added_tokens_decoder.
    explicit: set[int] = set()
    for text, token_id in files["added_tokens.json"].items():
        add(int(token_id), text, T.USER_DEFINED, "added_tokens.json")
        explicit.add(int(token_id))
    for key, data in files["tokenizer_config.json"].get("added_tokens_decoder", {}).items():
        text = data["content"]
        special = data.get("special") or looks_special(text)
        add(int(key), text, T.CONTROL if special else T.USER_DEFINED, "tokenizer_config.json")
        explicit.add(int(key))
    # transformers 5 keeps added tokens only in tokenizer.json: take those the model lacks.
    for data in files[TOKENIZER_FILE].get("added_tokens", []):
        token_id, text = int(data["id"]), data["content"]
        if token_id in explicit or (token_id < n_pieces and spm.id_to_piece(token_id) == text):
            continue
        special = data.get("special") or looks_special(text)
        add(token_id, text, T.CONTROL if special else T.USER_DEFINED, TOKENIZER_FILE)

    add_prefix_space = files["tokenizer_config.json"].get("add_prefix_space")
    if add_prefix_space is None and not proto.normalizer_spec.add_dummy_prefix:
        add_prefix_space = False  # llama.cpp prepends "▁" to SentencePiece text unless told
    builtin = {"bos": spm.bos_id(), "eos": spm.eos_id(), "unk": spm.unk_id(), "pad": spm.pad_id()}
    return Vocab(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=scores,
        add_space_prefix=add_prefix_space,
        builtin_ids={kind: i for kind, i in builtin.items() if 0 <= i < n},
    )


def byte_level_bpe_vocab(path: Path, files: dict[str, dict], vocab_size: int | None) -> Vocab:
    from tokenizers import Tokenizer

    spec = files[TOKENIZER_FILE]
    model_type = spec.get("model", {}).get("type")
    if model_type != "BPE":
        raise TokenizerError(
            f"{path}: a {model_type} tokenizer; supported are byte-level BPE tokenizer.json "
            f"and SentencePiece {SENTENCEPIECE_FILE}"
        )
    if "ByteLevel" not in component_types(spec.get("pre_tokenizer")):
        raise TokenizerError(
            f"{path}: a BPE tokenizer without byte-level pre-tokenization (SentencePiece-style); "
            f"supported only with its {SENTENCEPIECE_FILE}"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path}: the tokenizers library cannot load it ({exc})") from exc

    pre = pre_tokenizer_name(tokenizer, path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    n = vocab_size or max(len(vocab), max(vocab.values(), default=-1) + 1)
    if max(vocab.values(), default=-1) >= n:
        raise TokenizerError(
            f"{path}: token id {max(vocab.values())} does not fit vocab_size {n} (config.json)"
        )
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            if not added[i].normalized:
                # llama.cpp matches added tokens as their normalized text, so store it that way
                ids = tokenizer.encode(token, add_special_tokens=False).ids
                token = tokenizer.decode(ids, skip_special_tokens=False)
            if added[i].special or looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
    return Vocab(model="gpt2", pre=pre, tokens=tokens, types=types)


def component_types(node: Any) -> set[str]:
    """Every ``type`` inside a tokenizer.json component (a Sequence nests others)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(component_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(component_types(v) for v in node))
    return set()


def pre_tokenizer_name(tokenizer: Any, path: Path) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE, found as the
    converter finds it: by the ids it gives ``CHECK_TEXT`` (special tokens added, as
    ``AutoTokenizer.encode`` adds them)."""
    ids = tokenizer.encode(CHECK_TEXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        supported = ", ".join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))
        raise TokenizerError(
            f"{path}: unknown BPE pre-tokenizer (check-text hash {digest}); llama.cpp would "
            f"split text differently from it. Supported: {supported}"
        )
    return name


def special_vocab(folder: Path, files: dict[str, dict], vocab: Vocab) -> gguf.SpecialVocab:
    """gguf-py's SpecialVocab as the converter builds it, with the gaps it leaves filled (never
    overriding it): token texts in tokenizer_config.json / special_tokens_map.json looked up in
    the whole vocabulary, ids from generation_config.json and from the SentencePiece model,
    add_bos/add_eos always explicit, a chat template without a tokenizer_config.json."""
    try:
        special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    except ValueError as exc:  # a negative special id in config.json, an unknown merges format
        raise TokenizerError(f"{folder}: gguf-py cannot read its special tokens ({exc})") from exc
    ids = {t.decode() if isinstance(t, bytes) else t: i for i, t in enumerate(vocab.tokens)}

    def fill(kind: str, token_id: Any) -> None:
        if isinstance(token_id, int) and token_id >= 0:
            special._set_special_token(kind, token_id)  # keeps an id already found

    # SpecialVocab resolves token texts only through tokenizer.json's added tokens
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        for kind in special.special_token_types:
            entry = files[name].get(f"{kind}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            fill(kind, ids.get(text) if isinstance(text, str) else None)
    for kind in special.special_token_types:
        token_id = files["generation_config.json"].get(f"{kind}_token_id")
        if isinstance(token_id, list) and token_id:
            token_id = token_id[0]  # several stop ids: the first is the model's own eos
        fill(kind, token_id)
    for kind, token_id in (vocab.builtin_ids or {}).items():
        fill(kind, token_id)
    # What HF and llama.cpp do when nothing says: SentencePiece (Llama/Mistral) adds BOS only;
    # a byte-level BPE tokenizer adds what its post-processor adds (SpecialVocab read that).
    special.add_special_token.setdefault("bos", vocab.model == "llama")
    special.add_special_token.setdefault("eos", False)
    if special.chat_template is None:  # SpecialVocab reads templates only next to a tokenizer_config
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            special.chat_template = jinja.read_text(encoding="utf-8")
        elif isinstance(files["chat_template.json"].get("chat_template"), str):
            special.chat_template = files["chat_template.json"]["chat_template"]
    if vocab.model == "gpt2" and not special.merges:
        raise TokenizerError(f"{folder / TOKENIZER_FILE}: a BPE tokenizer without merges")
    return special
