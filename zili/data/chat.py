"""Conversations -> token ids and a loss mask, rendered with the tokenizer's own chat template.

A conversation is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
(`validate_conversation`). Keys other than role and content are ignored: the template sees exactly
`{"role", "content"}` per message.

The template (`load_chat_template`) is looked up in a tokenizer directory the way transformers looks it up:
`chat_template.jinja` if present (what recent transformers' save_pretrained writes), else `chat_template` in
tokenizer_config.json (a string, or a list of `{"name", "template"}` from which "default" is taken), else
zili's default, `DEFAULT_CHAT_TEMPLATE` (below).

Rendering matches transformers' `apply_chat_template`: Jinja in an immutable sandbox with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` block tag (rendered as its body), a
`tojson` filter that keeps non-ASCII characters and takes `indent`/`separators`/`sort_keys`, and the globals
`raise_exception(message)` and `strftime_now(format)`. The context is `messages`, `add_generation_prompt`,
`tools=None`, `documents=None` and the tokenizer config's special tokens (`bos_token`, `eos_token`,
`unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token` where set, plus other `*_token` strings and
named `extra_special_tokens`). The rendered text is tokenized whole with the tokenizer's `tokenizers` backend,
`add_special_tokens=False` (the template writes BOS itself if it wants one), with truncation and padding off —
which is what `apply_chat_template(tokenize=True)` does.

The loss mask (`encode_conversation`): True on the tokens the model is trained to produce — each assistant
message's rendered content and the end-of-turn marker the template writes after it (`<|im_end|>` in ChatML);
False on system and user turns and on the assistant header (`<|im_start|>assistant\\n`). Token t is a target
when `mask[t]`: the loss at position t-1, which predicts `ids[t]`, counts.

How the assistant spans are found (`assistant_spans`), for templates without `{% generation %}` tags: for
assistant message i, render `messages[:i]` with `add_generation_prompt=True` (everything up to where the model
starts writing) and `messages[:i+1]` without it (everything through the end of the turn). Both must be
prefixes of the whole conversation's rendering; the characters between their ends are the turn, less the
whitespace the template writes after the end-of-turn marker (generation stops at the marker, so that newline
is never produced; the message's own trailing whitespace is kept). Characters map to tokens through the
tokenizer's offsets: a token is masked when it overlaps a span (a token straddling the header and the
content is the model's to produce). The assumption — a prefix of the conversation renders to a prefix of
its rendering — holds for ChatML (Qwen2/2.5), Llama 3, Gemma and most templates; templates that rewrite
earlier turns depending on what follows (Qwen3's reasoning handling, Mistral's system message folded into
the last user turn) break it, and encoding then raises a UserError naming the template. Other limits: a
template that ignores `add_generation_prompt` gets its assistant header masked too (nothing marks where the
header ends); special tokens that a transformers tokenizer class supplies as defaults when the config omits
them (not null) are not known here — tokenizer configs on the Hub list them.

DEFAULT_CHAT_TEMPLATE is ChatML, token for token what Qwen2 writes without its default system message:
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, and `<|im_start|>assistant\\n` as the generation
prompt. It uses `<|im_start|>` and `<|im_end|>` (`CHAT_TOKENS`). Tokenizers trained by `train_bpe` so far have
only `<|endoftext|>` as a special token: the markers are then spelled with several ordinary tokens — training
and masking are still exact, but a generator must stop on that token sequence rather than one id. Adding
`CHAT_TOKENS` to the trainer's special tokens (ids 1 and 2, after `<|endoftext|>`) makes each marker one id.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zili.data.tokenizer import CONFIG_FILE, Tokenizer, _token_name
from zili.errors import UserError

ROLES = ("system", "user", "assistant")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TEMPLATE_FILE = "chat_template.jinja"  # where transformers' save_pretrained writes a single template
LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
DEFAULT_TEMPLATE_NAME = "zili's default ChatML template"
# the special tokens transformers passes to every template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True, eq=False)
class ChatTemplate:
    """A Jinja chat template and the special tokens its tokenizer config passes to it.

    `name` says where the template came from (a file path, or DEFAULT_TEMPLATE_NAME) for error messages;
    `default` is True for zili's default template.
    """

    source: str
    name: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    default: bool = False


def default_chat_template(special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
    """zili's default template (ChatML, see the module docstring) with the given special tokens."""
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_NAME, dict(special_tokens or {}), default=True)


def load_chat_template(directory: str | Path) -> ChatTemplate:
    """The chat template of the tokenizer in `directory` (lookup order in the module docstring).

    UserError for an unreadable tokenizer_config.json, a list of templates without "default", a template that
    is not a string, or one Jinja cannot parse.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else {}
    special = _special_tokens(directory, config)
    jinja_path = directory / TEMPLATE_FILE
    if jinja_path.is_file():
        try:
            source = jinja_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{jinja_path} is not UTF-8 (byte {e.start}) — fix or delete it") from None
        template = ChatTemplate(source, str(jinja_path), special)
    elif config.get("chat_template") is not None:
        template = ChatTemplate(_pick_default(config["chat_template"], config_path), str(config_path), special)
    else:
        return default_chat_template(special)
    _compiled(template)  # parse now, so a broken template is reported before any data is read
    return template


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}) — fix or delete it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a JSON object — fix or delete it")
    return value


def _pick_default(value, path: Path) -> str:
    """`chat_template` from a tokenizer config: a string, or named templates (a list of {name, template})."""
    if isinstance(value, str):
        return value
    named = None
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        named = {t["name"]: t["template"] for t in value}
    elif isinstance(value, dict):
        named = value
    if named is None:
        raise UserError(f"chat_template in {path} is a {type(value).__name__} — it must be a string or a list of "
                        f'{{"name": ..., "template": ...}} objects')
    if "default" not in named:
        raise UserError(f"chat_template in {path} names templates {sorted(map(str, named))} but none is "
                        f'"default" — name the one to use "default"')
    if not isinstance(named["default"], str):
        raise UserError(f'the "default" chat_template in {path} is not a string — fix the tokenizer config')
    return named["default"]


def _special_tokens(directory: Path, config: dict) -> dict[str, str]:
    """The special tokens transformers passes to the template: named `*_token` entries of the config."""
    values = dict(config)
    legacy = directory / LEGACY_SPECIAL_TOKENS_FILE
    if "added_tokens_decoder" not in config and legacy.is_file():
        values.update(_read_json(legacy))  # transformers reads this older file only then, and lets it win
    tokens = {}
    for key, value in values.items():
        if key in SPECIAL_TOKEN_KEYS or key.endswith("_token"):
            text = _token_name(value)
            if text is not None:
                tokens[key] = text
    extra = values.get("extra_special_tokens") or values.get("additional_special_tokens")
    if isinstance(extra, dict):  # model-specific named tokens (e.g. image_token) are passed too
        for key, value in extra.items():
            text = _token_name(value)
            if text is not None:
                tokens[str(key)] = text
    return tokens


# ---- validation ------------------------------------------------------------------------------------------


def validate_conversation(record: object) -> list[dict[str, str]]:
    """The messages of a conversation record `{"messages": [...]}`, checked (see `validate_messages`)."""
    if not isinstance(record, dict) or "messages" not in record:
        raise UserError('the record has no field "messages" — a conversation is {"messages": [{"role": ..., '
                        '"content": ...}, ...]}')
    return validate_messages(record["messages"])


def validate_messages(messages: object, need_assistant: bool = True) -> list[dict[str, str]]:
    """`messages` as a list of `{"role", "content"}` dicts, checked; UserError (one line) naming what is wrong.

    Each message needs a role in ROLES and string content (possibly empty); the list must not be empty and,
    with `need_assistant`, must hold an assistant message (otherwise there is nothing to train on).
    """
    if not isinstance(messages, list | tuple):
        raise UserError(f'"messages" is a {type(messages).__name__}, not a list of messages')
    if not messages:
        raise UserError('"messages" is empty — a conversation needs at least one message')
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"messages[{i}] is a {type(message).__name__}, not an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"messages[{i}] has role {role!r} — use one of {', '.join(ROLES)}")
        if "content" not in message:
            raise UserError(f"messages[{i}] ({role}) has no content")
        content = message["content"]
        if not isinstance(content, str):
            raise UserError(f"messages[{i}] ({role}): content is a {type(content).__name__}, not a string "
                            f"(lists of content parts are not supported — join them into one string)")
        checked.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in checked):
        raise UserError("the conversation has no assistant message — nothing to train on")
    return checked


# ---- rendering -------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore-prefixed names (a way out of the sandbox otherwise)."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON, non-ASCII kept
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=32)
def _compile_source(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _compiled(template: ChatTemplate) -> jinja2.Template:
    try:
        return _compile_source(template.source)
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template ({template.name}) is not valid Jinja: {_one_line(e)}") from None


def render(template: ChatTemplate, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The text `template` renders for `messages` (validated, see `validate_messages`), as transformers renders it.

    UserError when the template raises (e.g. `raise_exception("roles must alternate")`) or fails on the messages.
    """
    return _render(template, validate_messages(messages, need_assistant=False), add_generation_prompt)


def _render(template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool,
            what: str = "this conversation") -> str:
    compiled = _compiled(template)
    context = dict(template.special_tokens)
    context.update(messages=[dict(m) for m in messages], tools=None, documents=None,
                   add_generation_prompt=add_generation_prompt)
    try:
        return compiled.render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, LookupError) as e:
        raise UserError(f"the chat template ({template.name}) failed on {what}: {_one_line(e)}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---- spans, tokens and the mask --------------------------------------------------------------------------


def assistant_spans(template: ChatTemplate, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of its assistant turns), in order.

    Method and assumption in the module docstring; UserError if the assumption fails for this template.
    """
    checked = validate_messages(messages)
    full = _render(template, checked, False)
    spans = []
    for i, message in enumerate(checked):
        if message["role"] != "assistant":
            continue
        before = _render(template, checked[:i], True, f"messages[:{i}] with the generation prompt")
        through = _render(template, checked[: i + 1], False, f"messages[:{i + 1}]")
        for part, what in ((before, f"messages[:{i}] with the generation prompt"), (through, f"messages[:{i + 1}]")):
            if not full.startswith(part):
                raise UserError(f"the chat template ({template.name}) renders {what} as something that is not a "
                                f"prefix of the whole conversation, so assistant turns cannot be located — this "
                                f"template rewrites earlier turns; use a template without that behaviour")
        start, end = len(before), len(through)
        if end <= start:
            raise UserError(f"the chat template ({template.name}) renders nothing for assistant messages[{i}] after "
                            f"its generation prompt — assistant turns cannot be located with this template")
        spans.append((start, start + _turn_length(full[start:end], message["content"])))
    return full, spans


def _turn_length(turn: str, content: str) -> int:
    """Length of `turn` without the whitespace written after the end-of-turn marker (the content's own stays)."""
    keep = len(turn.rstrip())
    if content.strip():
        at = turn.rfind(content)
        if at >= 0:
            keep = max(keep, at + len(content))
    return keep


def encode_conversation(tokenizer: Tokenizer, template: ChatTemplate,
                        messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, loss mask), as long as each other.

    The ids equal transformers' `apply_chat_template(messages, tokenize=True)`; `mask[t]` is True when token t
    belongs to an assistant turn (content and end-of-turn marker). UserError for an invalid conversation
    (`validate_messages`), a template that fails on it or breaks the prefix assumption, or a conversation whose
    assistant turns hold no token.
    """
    text, spans = assistant_spans(template, messages)
    encoding = _plain_backend(tokenizer.backend).encode(text, add_special_tokens=False)
    mask = [False] * len(encoding.ids)
    j = 0
    for t, (start, end) in enumerate(encoding.offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j == len(spans):
            break
        mask[t] = end > spans[j][0]  # overlaps span j (it starts before the span ends, by the loop above)
    if not any(mask):
        raise UserError(f"the chat template ({template.name}) leaves no token of the assistant messages — "
                        f"nothing to train on")
    return list(encoding.ids), mask


def encode_prompt(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` followed by the generation prompt (the assistant header), for generation.

    Equal to transformers' `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`.
    """
    text = render(template, messages, add_generation_prompt=True)
    return list(_plain_backend(tokenizer.backend).encode(text, add_special_tokens=False).ids)


# backend -> a copy without post-processor, truncation or padding (made once per backend, dropped with it)
_PLAIN_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_backend(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """`backend`, or a copy of it that encodes as transformers' fast tokenizers call it for chats.

    transformers turns truncation and padding off before encoding; a tokenizer.json may ship with them on.
    The post-processor adds nothing with `add_special_tokens=False`, but one may trim whitespace off the
    offsets (GPT-2's `ByteLevel(trim_offsets=True)`), leaving whitespace tokens with empty offsets that
    the mask would miss — so the copy has none, and its offsets cover every character.
    """
    if backend.post_processor is None and backend.truncation is None and backend.padding is None:
        return backend
    plain = _PLAIN_BACKENDS.get(backend)
    if plain is None:
        plain = tokenizers.Tokenizer.from_str(backend.to_str())
        plain.post_processor = None
        plain.no_truncation()
        plain.no_padding()
        _PLAIN_BACKENDS[backend] = plain
    return plain
