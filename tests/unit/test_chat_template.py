"""zili.data.chat: chat templates rendered and tokenized exactly as transformers does, and the assistant-only mask.

A tiny byte-level BPE with Qwen2's special tokens and pre-tokenizer is trained in the test and saved with
transformers' save_pretrained, together with Qwen2.5's chat template; zili's ids must equal
`AutoTokenizer.apply_chat_template` token for token, and zili's mask must equal transformers' own
assistant mask for the same template with `{% generation %}` tags.
"""

import json

import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from zili.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    assistant_spans,
    default_chat_template,
    encode_conversation,
    encode_prompt,
    load_chat_template,
    render,
    validate_conversation,
    validate_messages,
)
from zili.data.tokenizer import Tokenizer, train_bpe
from zili.errors import UserError

transformers = pytest.importorskip("transformers")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2/Qwen2.5)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")

# Qwen2.5-Instruct's chat template (tokenizer_config.json), tools branch included
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 — the template verbatim

# the same rendering, with transformers' {% generation %} tags around what an assistant turn trains on
QWEN25_GENERATION_TEMPLATE = QWEN25_TEMPLATE.replace(
    """    {%- if (message.role == "user") or""",
    """    {%- if message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>assistant\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}
    {%- elif (message.role == "user") or""")  # noqa: E501

CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system\nuser\nassistant\nWhat is two plus two? Two plus two is four.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "naïve café, 中文, emoji 🤖 — très bien",
] * 4

CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ],
    "no_system": [  # Qwen2.5 writes its default system message
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "You answer questions."},
        {"role": "user", "content": "To be?"},
        {"role": "assistant", "content": "Or not to be."},
        {"role": "user", "content": "That is the question:"},
        {"role": "assistant", "content": "Whether 'tis nobler\nin the mind to suffer"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": ""},  # an empty answer still trains the end-of-turn marker
    ],
    "unicode": [
        {"role": "user", "content": "naïve café 中文 🤖?"},
        {"role": "assistant", "content": "答案是 42 — très bien 🙂\n\n```py\nprint('x')\n```\n  "},
        {"role": "user", "content": "  leading spaces\tand tabs\r\n"},
        {"role": "assistant", "content": "   \n"},
    ],
}


def _qwen_like_backend(trim_offsets: bool = False) -> HFTokenizer:
    """A tiny byte-level BPE built like Qwen2's tokenizer.json (NFC, split regex, ByteLevel), Qwen2's specials."""
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer=trainer)
    # Qwen2 ships trim_offsets=False; GPT-2 style True trims whitespace off the offsets (zili must not care)
    hf.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=False)
    return hf


def _save_hf(directory, template, trim_offsets=False, jinja_file=True):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_qwen_like_backend(trim_offsets),
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                chat_template=template)
    fast.save_pretrained(str(directory), save_jinja_files=jinja_file)
    return directory


@pytest.fixture(scope="module", params=["jinja_file", "tokenizer_config", "trim_offsets", "qwen2_class"])
def qwen_dir(request, tmp_path_factory):
    """A Qwen2-style tokenizer directory: the template in chat_template.jinja or in tokenizer_config.json, a
    GPT-2 style offset-trimming post-processor, or loaded by transformers as Qwen2Tokenizer (as Qwen2 ships)."""
    directory = tmp_path_factory.mktemp(request.param)
    _save_hf(directory, QWEN25_TEMPLATE, trim_offsets=request.param == "trim_offsets",
             jinja_file=request.param != "tokenizer_config")
    if request.param == "qwen2_class":
        config = json.loads((directory / "tokenizer_config.json").read_text())
        # as in Qwen2.5's tokenizer_config.json; the explicit nulls override Qwen2Tokenizer's default unk_token
        config.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, unk_token=None)
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _hf_ids(auto, messages, **kwargs):
    return list(auto.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def _masked_runs(tokenizer, ids, mask):
    """The decoded text of each maximal run of masked tokens."""
    runs, run = [], []
    for token, masked in zip(ids, mask):
        if masked:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs


def _assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


def test_template_is_found_where_transformers_keeps_it(qwen_dir):
    template = load_chat_template(qwen_dir)
    assert template.source == QWEN25_TEMPLATE and not template.default
    assert template.name.endswith("chat_template.jinja" if (qwen_dir / "chat_template.jinja").exists()
                                  else "tokenizer_config.json")
    auto = transformers.AutoTokenizer.from_pretrained(str(qwen_dir))
    assert template.special_tokens == auto.special_tokens_map  # what apply_chat_template passes to the template


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_ids_equal_transformers_apply_chat_template(qwen_dir, name):
    messages = CONVERSATIONS[name]
    tokenizer = Tokenizer.load(qwen_dir)
    template = load_chat_template(qwen_dir)
    auto = transformers.AutoTokenizer.from_pretrained(str(qwen_dir))

    assert render(template, messages) == auto.apply_chat_template(messages, tokenize=False)
    ids, mask = encode_conversation(tokenizer, template, messages)
    assert ids == _hf_ids(auto, messages) and len(mask) == len(ids)

    prompt = messages[:-1]  # ends with a user turn
    expected = _hf_ids(auto, prompt, add_generation_prompt=True)
    assert encode_prompt(tokenizer, template, prompt) == expected
    assert tokenizer.decode(expected).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ids[:len(expected)] == expected  # with special-token markers, the prompt is the turn's exact prefix


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mask_is_assistant_content_and_end_of_turn(qwen_dir, name):
    messages = CONVERSATIONS[name]
    tokenizer = Tokenizer.load(qwen_dir)
    ids, mask = encode_conversation(tokenizer, load_chat_template(qwen_dir), messages)

    assert _masked_runs(tokenizer, ids, mask) == [c + "<|im_end|>" for c in _assistant_contents(messages)]
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in unmasked  # system and user text are never trained on
    assert "<|im_start|>assistant\n" in unmasked  # nor is the assistant header
    assert sum(t == tokenizer.backend.token_to_id("<|im_end|>") for t, m in zip(ids, mask) if m) == len(
        _assistant_contents(messages))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mask_equals_transformers_generation_tag_mask(tmp_path, name):
    """transformers' own assistant mask for the same rendering with {% generation %} tags equals zili's mask."""
    messages = CONVERSATIONS[name]
    tagged = _save_hf(tmp_path / "tagged", QWEN25_GENERATION_TEMPLATE)
    plain = _save_hf(tmp_path / "plain", QWEN25_TEMPLATE)
    auto = transformers.AutoTokenizer.from_pretrained(str(tagged))
    out = auto.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)

    tokenizer = Tokenizer.load(plain)
    ids, mask = encode_conversation(tokenizer, load_chat_template(plain), messages)
    assert ids == list(out["input_ids"])
    assert [int(m) for m in mask] == list(out["assistant_masks"])
    # and zili renders the tagged template too (the tag renders its body), with the same result
    assert encode_conversation(tokenizer, load_chat_template(tagged), messages) == (ids, mask)


def test_spans_leave_out_the_newline_after_the_end_of_turn_marker(tmp_path):
    template = ChatTemplate(QWEN25_TEMPLATE, "qwen2.5")
    messages = CONVERSATIONS["multi_turn"]
    text, spans = assistant_spans(template, messages)
    assert [text[a:b] for a, b in spans] == [c + "<|im_end|>" for c in _assistant_contents(messages)]
    assert all(text[b] == "\n" for _, b in spans)


def test_offsets_trimmed_by_the_post_processor_do_not_shift_the_mask():
    # GPT-2 style ByteLevel(trim_offsets=True) reports a token " " as the empty span after it, so the content's
    # last space would fall outside the turn (which ends at the content here: no end marker); zili reads
    # untrimmed offsets
    template = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant:{% endif %}", "no end marker")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "hi  "}]
    for trim in (False, True):
        tokenizer = Tokenizer(_qwen_like_backend(trim_offsets=trim), {"eos_token": "<|im_end|>"})
        ids, mask = encode_conversation(tokenizer, template, messages)
        assert [tokenizer.decode([t]) for t in ids][-3:] == [" ", " ", "\n"]
        assert _masked_runs(tokenizer, ids, mask) == ["hi  "]


def test_truncation_and_padding_in_tokenizer_json_are_ignored():
    # transformers turns them off before encoding a chat; a tokenizer.json may ship with them on
    template = ChatTemplate(QWEN25_TEMPLATE, "qwen2.5")
    messages = CONVERSATIONS["multi_turn"]
    plain = Tokenizer(_qwen_like_backend(), {"eos_token": "<|im_end|>"})
    backend = _qwen_like_backend()
    backend.enable_truncation(max_length=8)
    backend.enable_padding(length=512)
    tokenizer = Tokenizer(backend, {"eos_token": "<|im_end|>"})
    assert encode_conversation(tokenizer, template, messages) == encode_conversation(plain, template, messages)
    assert encode_prompt(tokenizer, template, messages[:-1]) == encode_prompt(plain, template, messages[:-1])
    assert len(encode_prompt(plain, template, messages[:-1])) > 8
    assert backend.truncation is not None and backend.padding is not None  # the caller's tokenizer is untouched


# ---- zili's default template on a zili-trained tokenizer -------------------------------------------------


@pytest.fixture(scope="module")
def zili_tokenizer():
    return train_bpe(CORPUS, 320)


def _chatml(messages, add_generation_prompt=False):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_default_template_round_trip_on_a_zili_tokenizer(zili_tokenizer, tmp_path, name):
    messages = CONVERSATIONS[name]
    zili_tokenizer.save(tmp_path)
    template = load_chat_template(tmp_path)  # zili's tokenizer_config.json has no chat_template
    assert template.default and template.source == DEFAULT_CHAT_TEMPLATE
    assert template.special_tokens == {"eos_token": "<|endoftext|>"}

    ids, mask = encode_conversation(zili_tokenizer, template, messages)
    assert zili_tokenizer.decode(ids) == render(template, messages) == _chatml(messages)
    # the markers are plain text to this tokenizer (no chat special tokens), yet each run is exactly the
    # content and its <|im_end|>, since byte-level pre-tokenization splits at the newlines around them
    runs = _masked_runs(zili_tokenizer, ids, mask)
    assert runs == [c + "<|im_end|>" for c in _assistant_contents(messages)]
    prompt = encode_prompt(zili_tokenizer, template, messages[:-1])
    assert zili_tokenizer.decode(prompt) == _chatml(messages[:-1], add_generation_prompt=True)

    # transformers renders and tokenizes zili's default template identically
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert _hf_ids(auto, messages) == ids
    assert _hf_ids(auto, messages[:-1], add_generation_prompt=True) == prompt
    assert load_chat_template(tmp_path).name == str(config_path)


def test_a_token_straddling_header_and_content_is_masked(zili_tokenizer):
    # the header "assistant: th" and the content "e question" tokenize as ..., ":", " the", " ", "qu", ...: the
    # token " the" is partly the header, but the model produces it, so it is a target; the last newline is not
    template = ChatTemplate("{% for m in messages %}{{ m.role }}: th{{ m.content }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant: th{% endif %}", "straddle")
    messages = [{"role": "user", "content": "ink"}, {"role": "assistant", "content": "e question"}]
    ids, mask = encode_conversation(zili_tokenizer, template, messages)
    assert zili_tokenizer.decode(ids) == "user: think\nassistant: the question\n"
    assert " the" in [zili_tokenizer.decode([t]) for t in ids]
    assert _masked_runs(zili_tokenizer, ids, mask) == [" the question"]


def test_default_template_for_an_in_memory_tokenizer(zili_tokenizer):
    template = default_chat_template({"eos_token": zili_tokenizer.eos_token})
    messages = CONVERSATIONS["system"]
    assert render(template, messages, add_generation_prompt=False) == _chatml(messages)


# ---- template lookup, Jinja features, and errors ----------------------------------------------------------


def test_named_templates_in_tokenizer_config_pick_default(tmp_path, zili_tokenizer):
    zili_tokenizer.save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": DEFAULT_CHAT_TEMPLATE}]
    config_path.write_text(json.dumps(config))
    template = load_chat_template(tmp_path)
    assert template.source == DEFAULT_CHAT_TEMPLATE and not template.default
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = CONVERSATIONS["unicode"]
    assert _hf_ids(auto, messages) == encode_conversation(zili_tokenizer, template, messages)[0]

    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="none is \"default\""):
        load_chat_template(tmp_path)


FEATURES_TEMPLATE = r"""{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
[{{ ns.turns }}] {{ m | tojson }} {{ dict(role=m.role, n=loop.index) | tojson(indent=2) }}
{{ m.content | tojson(separators=(',', ':')) }} {{ {'b': 1, 'a': [m.role]} | tojson(sort_keys=True) }}
  {% if m.content == 'stop' %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ eos_token }}<go>{% endif %}
{{ strftime_now('%Y') | length }}"""


def test_jinja_features_render_as_in_transformers(tmp_path):
    _save_hf(tmp_path, FEATURES_TEMPLATE)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = "<|endoftext|>"
    config_path.write_text(json.dumps(config))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    template = load_chat_template(tmp_path)
    messages = [{"role": "system", "content": "skipped"}, {"role": "user", "content": "ünï \"quoted\" <b>&"},
                {"role": "assistant", "content": "stop"}, {"role": "user", "content": "after the break"}]
    for add in (False, True):
        text = render(template, messages, add_generation_prompt=add)
        assert text == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
    assert "ünï" in text and "after the break" not in text and "<b>&" in text and text.startswith("<|endoftext|>")


def test_raise_exception_becomes_a_user_error_naming_the_template():
    template = ChatTemplate("{% for m in messages %}{% if m.role == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}"
                            "{% endfor %}", "/models/x/tokenizer_config.json")
    with pytest.raises(UserError, match=r"x/tokenizer_config\.json.*System role not supported"):
        encode_conversation(train_bpe(CORPUS, 300), template, CONVERSATIONS["system"])


def test_sandbox_refuses_unsafe_access():
    template = ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}{{ messages.__class__ }}", "unsafe")
    with pytest.raises(UserError, match="unsafe"):
        render(template, CONVERSATIONS["system"])
    mutate = ChatTemplate("{{ messages.append(1) }}", "mutating")
    with pytest.raises(UserError, match="mutating"):
        render(mutate, CONVERSATIONS["system"])


def test_invalid_jinja_is_reported_when_loading(tmp_path, zili_tokenizer):
    zili_tokenizer.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }}\n")
    with pytest.raises(UserError, match=r"chat_template\.jinja\) is not valid Jinja") as info:
        load_chat_template(tmp_path)
    assert "\n" not in str(info.value)


def test_a_template_failing_on_a_prefix_says_which(zili_tokenizer):
    # Qwen2.5's template reads messages[0], so it cannot render the empty prefix before a leading assistant turn
    messages = [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}]
    with pytest.raises(UserError, match=r"\(qwen2\.5\) failed on messages\[:0\] with the generation prompt"):
        encode_conversation(zili_tokenizer, ChatTemplate(QWEN25_TEMPLATE, "qwen2.5"), messages)


def test_template_that_rewrites_earlier_turns_is_refused(zili_tokenizer):
    # like Qwen3's reasoning handling: the last assistant turn renders differently from the same turn later on
    template = ChatTemplate("{% for m in messages %}<{{ m.role }}>"
                            "{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}"
                            "{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
                            "/models/qwen3-like/chat_template.jinja")
    with pytest.raises(UserError, match=r"qwen3-like/chat_template\.jinja.*not a prefix"):
        encode_conversation(zili_tokenizer, template, CONVERSATIONS["multi_turn"])
    # a single assistant turn at the end is fine: its rendering is the same in the prefix and the whole
    ids, mask = encode_conversation(zili_tokenizer, template, CONVERSATIONS["no_system"])
    assert _masked_runs(zili_tokenizer, ids, mask) == ["<think></think>Hello! How can I help?</s>"]


@pytest.mark.parametrize("record, message", [
    ({"text": "hi"}, 'no field "messages"'),
    ([{"role": "user", "content": "hi"}], 'no field "messages"'),
    ({"messages": "hi"}, "is a str, not a list"),
    ({"messages": []}, "is empty"),
    ({"messages": ["hi"]}, r"messages\[0\] is a str"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"messages\[0\] has role 'bot' — use one of system, user"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\] has role None"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, r"messages\[1\] \(assistant\) has no "
                                                                            r"content"),
    ({"messages": [{"role": "user", "content": None}]}, r"messages\[0\] \(user\): content is a NoneType"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "content is a list"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}, "no assistant message"),
])
def test_bad_conversations_are_one_line_user_errors(record, message):
    with pytest.raises(UserError, match=message) as info:
        validate_conversation(record)
    assert "\n" not in str(info.value)


def test_validation_keeps_role_and_content_only_and_prompts_need_no_assistant(zili_tokenizer):
    messages = validate_conversation({"messages": [{"role": "user", "content": "q", "name": "x"},
                                                   {"role": "assistant", "content": "a", "weight": 0}]})
    assert messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert validate_messages([{"role": "user", "content": "q"}], need_assistant=False)
    with pytest.raises(UserError, match="no assistant message"):
        encode_conversation(zili_tokenizer, default_chat_template(), [{"role": "user", "content": "q"}])
    assert encode_prompt(zili_tokenizer, default_chat_template(), [{"role": "user", "content": "q"}])
