"""The tokenizer: text <-> token ids, special tokens, end-of-generation ids and the chat template.

Built on the Rust ``tokenizers`` library, from either the metadata of a GGUF file
(``Tokenizer.from_gguf``) or a Hugging Face folder (``Tokenizer.from_folder``). Chat templates
are rendered with a sandboxed jinja2 environment set up the way ``transformers`` sets it up, so
prompts are byte-for-byte the ones the model was trained on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from fastinfer.errors import InvalidRequestError
from fastinfer.validation import check_messages, check_str

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# Split regexes of byte-level BPE vocabularies, keyed by GGUF ``tokenizer.ggml.pre``. They follow
# llama.cpp's llama-vocab.cpp and the ``tokenizer.json`` files those vocabularies ship with.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# GPT-2's own regex (the ByteLevel pre-tokenizer's), with every digit split off first.
_DIGITS_THEN_GPT2 = frozenset(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"))
_GPT2_DEFAULT = frozenset(("default", "gpt2", "gpt-2"))


class Tokenizer:
    """Encodes text to token ids and back, and renders chat templates.

    Build it with ``from_gguf`` or ``from_folder``. ``eos_token_ids`` holds every id that ends
    generation; ``eos_token_id`` is the primary one. ``encode`` prepends ``bos_token_id`` only
    when the model asks for it (``add_bos``).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        # Order kept for the primary id; the frozenset answers "does this id end generation?".
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.eos_token_ids = frozenset(eos_token_ids)
        self.add_bos = bool(add_bos) and bos_token_id is not None
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._backend_adds_bos = _post_processor_adds_bos(backend, bos_token_id)

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its metadata (``tokenizer.*`` keys).

        Supports ``tokenizer.ggml.model`` ``'gpt2'`` (byte-level BPE; the split regex follows
        ``tokenizer.ggml.pre``) and ``'llama'`` (SentencePiece-style BPE with byte fallback).
        Raises ``ValueError`` for any other tokenizer model or when the vocabulary is missing.
        """
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: cannot build a tokenizer")
        if kind == "gpt2":
            backend = _byte_level_backend(metadata)
        elif kind == "llama":
            backend = _sentencepiece_backend(metadata)
        else:
            raise ValueError(
                f"unsupported GGUF tokenizer model tokenizer.ggml.model={kind!r}; expected 'gpt2' or 'llama'"
            )
        bos = _opt_int(metadata.get("tokenizer.ggml.bos_token_id"))
        eos_ids = [
            i
            for key in ("eos_token_id", "eot_token_id", "eom_token_id")
            if (i := _opt_int(metadata.get(f"tokenizer.ggml.{key}"))) is not None
        ]
        # llama.cpp and transformers add BOS to SentencePiece vocabularies that do not say otherwise.
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=bos,
            eos_token_ids=_unique(eos_ids),
            add_bos=bool(add_bos),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build the tokenizer of a Hugging Face model folder.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (BOS/EOS tokens,
        ``add_bos_token``, chat template), ``chat_template.jinja``/``chat_template.json``, and the
        EOS ids of ``generation_config.json`` and ``config.json`` (an int or a list).
        """
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"no tokenizer.json in {path!r}: expected a Hugging Face tokenizer folder")
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        bos = _token_id(backend, config.get("bos_token"))
        eos_ids = [i for i in [_token_id(backend, config.get("eos_token"))] if i is not None]
        for name in ("generation_config.json", "config.json"):
            eos_ids += _as_id_list(_read_json(os.path.join(path, name)).get("eos_token_id"))
        if bos is None:
            bos = next(iter(_as_id_list(_read_json(os.path.join(path, "config.json")).get("bos_token_id"))), None)
        # Without an explicit flag the tokenizer.json post-processor decides, as in transformers.
        add_bos = config.get("add_bos_token", _post_processor_adds_bos(backend, bos))
        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=bos,
            eos_token_ids=_unique(eos_ids),
            add_bos=bool(add_bos),
            chat_template=_folder_chat_template(path, config),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (BOS/EOS tokens, whether a BOS
        is added, the chat template) to the folder ``path``: :meth:`from_folder` reads them back."""
        path = os.fspath(path)
        self._backend.save(os.path.join(path, "tokenizer.json"))
        config = {"bos_token": self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None,
                  "eos_token": self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None,
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    # ----------------------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS comes first when it wants one.

        Special tokens written in the text (``<|im_start|>``) always encode as their single id.
        """
        check_str("text", text, allow_empty=True)
        try:
            ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as exc:  # the Rust library's errors carry no common base class
            raise InvalidRequestError(f"the tokenizer cannot encode the text: {exc}", "text") from exc
        if add_special_tokens:
            if self.add_bos and not self._backend_adds_bos:
                ids.insert(0, self.bos_token_id)
            elif not self.add_bos and self._backend_adds_bos and ids[:1] == [self.bos_token_id]:
                del ids[0]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens are dropped when ``skip_special_tokens``."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of ``token_id`` (e.g. ``'Ġworld'``), or None when unknown."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled ``token``, or None."""
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token such as ``<|im_end|>``."""
        return token_id in self._special_ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (read it; do not reconfigure it)."""
        return self._backend

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of every special token (skipped by ``decode(skip_special_tokens=True)``)."""
        return self._special_ids

    # ----------------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the model's chat template (jinja2, sandboxed).

        Extra keyword arguments (``tools``, ``documents``...) are passed to the template. With
        ``tokenize`` the ids are returned, encoded without adding BOS again (the template writes
        whatever special tokens the model wants). ``messages`` are validated first (see
        ``validation.check_messages``); a model without a chat template, or a template that
        refuses the conversation (``raise_exception``), raises ``InvalidRequestError``.
        """
        messages = check_messages(messages)
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template: pass a plain prompt instead of messages",
                                      "messages")
        try:
            rendered = _compile_template(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_token_id),
                eos_token=self._token_text(self.eos_token_id),
                **kwargs,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template refused the messages: {exc}", "messages") from exc
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._backend.id_to_token(token_id) or ""

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_ids={sorted(self.eos_token_ids)}, add_bos={self.add_bos})"
        )


# --------------------------------------------------------------------------------- GGUF builders


@lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: bytes that print stay, the rest move past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_backend(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    spelling = _byte_to_char()
    alphabet = frozenset(spelling.values())
    vocab: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        # A normal token outside the byte alphabet was stored as plain text: spell its bytes. Added
        # tokens keep their text, which is what they match in the input.
        if kind == _TOKEN_NORMAL and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or ()]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, tokens, types)
    return backend


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The split of ``tokenizer.ggml.pre`` followed by the byte-to-char spelling."""
    if pre in _SPLIT_BY_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre is not None and pre not in _GPT2_DEFAULT:
        logger.warning("unknown GGUF pre-tokenizer %r: splitting text with GPT-2's regex", pre)
    return gpt2


def _sentencepiece_backend(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if metadata.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        scores = metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        merges = _merges_from_scores(tokens, types, scores, vocab)
    unk = _opt_int(metadata.get("tokenizer.ggml.unknown_token_id"))
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=tokens[unk] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = tokenizers.Tokenizer(model)
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_gguf_added_tokens(backend, tokens, types)
    return backend


def _merges_from_scores(
    tokens: Sequence[str], types: Sequence[int], scores: Sequence[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a normal token into two
    vocabulary entries, best score first (SentencePiece merges the highest-scoring pair)."""
    ranked: list[tuple[float, int, int, int, int, str, str]] = []
    for index, (token, kind, score) in enumerate(zip(tokens, types, scores)):
        if kind != _TOKEN_NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), index, vocab[left], left, right))
    ranked.sort(key=lambda r: r[:5])
    return [(left, right) for *_, left, right in ranked]


def _add_gguf_added_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added
    tokens, so the text ``<|im_start|>`` encodes as its one id instead of being cut into pieces."""
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k in (_TOKEN_CONTROL, _TOKEN_UNKNOWN) and t
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == _TOKEN_USER_DEFINED and t
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


# --------------------------------------------------------------------------------- folder helpers


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_id(backend: tokenizers.Tokenizer, token: Any) -> int | None:
    """The id of a special token given as text or as ``{"content": text, ...}``."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    return backend.token_to_id(token)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def _folder_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
    """The template from ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _post_processor_adds_bos(backend: tokenizers.Tokenizer, bos_token_id: int | None) -> bool:
    """Whether the backend's own post-processor puts BOS first (HF folders often do)."""
    if bos_token_id is None:
        return False
    return backend.encode("a", add_special_tokens=True).ids[:1] == [bos_token_id]


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------------- chat templates


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters, which chat templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox, with the helpers and whitespace rules of transformers."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
