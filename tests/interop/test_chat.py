"""`zili chat`: scripted turns from stdin, each answer what greedy generation gives for the whole conversation so
far rendered with the chat template (so the history and the template are what the model sees), from a Hugging
Face directory and from a run directory; the end-of-turn marker ends a reply and is not printed."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from tests.interop.conftest import transformers  # noqa: F401  (skips without transformers)
from zili.data.chat import default_chat_template, encode_prompt, load_chat_template
from zili.infer.chat import Sampling, chat, end_of_turn, load_chat_model
from zili.infer.generate import generate

QWEN2_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                  "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                  "{% endif %}")


def expected_answers(path, turns, system=None, max_new_tokens=6):
    """Greedy replies computed directly: the template over the conversation so far, cut at the marker."""
    model, tokenizer, template = load_chat_model(path, device="cpu")
    marker = end_of_turn(template)
    messages = [{"role": "system", "content": system}] if system else []
    answers = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        new = generate(model, encode_prompt(tokenizer, template, messages), max_new_tokens, eos_id=tokenizer.eos_id)
        text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
        text = text[: text.index(marker)] if marker in text else text
        answers.append(text)
        messages.append({"role": "assistant", "content": text})
    return answers, messages


@pytest.mark.parametrize("template", ["default", "qwen2"])
def test_two_scripted_turns_from_a_hugging_face_directory(hf_models, tmp_path, template):
    path = tmp_path / "qwen2"
    shutil.copytree(hf_models["qwen2"], path)
    if template == "qwen2":
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN2_TEMPLATE}))
    turns = ["def fill(text):", "and wrap?"]
    answers, messages = expected_answers(path, turns, system="be brief")
    out = io.StringIO()
    got = chat(path, Sampling(temperature=0.0, max_new_tokens=6), system="be brief", device="cpu",
               stdin=io.StringIO("\n".join(turns) + "\n"), out=out)
    assert out.getvalue() == "".join(a + "\n" for a in answers)
    assert got == messages
    assert load_chat_template(path).source == (QWEN2_TEMPLATE if template == "qwen2"
                                               else default_chat_template().source)


def test_a_run_directory_chats_with_its_tokenizer_template(hf_models, tmp_path, zili_cli):
    run = tmp_path / "run"
    assert zili_cli("import-hf", hf_models["qwen2"], run).returncode == 0
    answers, _ = expected_answers(run, ["import textwrap"], max_new_tokens=5)
    proc = zili_cli("chat", run, "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu",
                    input="import textwrap\n")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout == answers[0] + "\n"


def test_end_of_turn_is_what_follows_an_assistant_message():
    assert end_of_turn(default_chat_template()) == "<|im_end|>"


def test_not_a_model_directory_is_one_line(tmp_path, zili_cli):
    proc = zili_cli("chat", tmp_path, input="hi\n")
    assert proc.returncode == 2 and "neither a zili run directory nor a Hugging Face" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_reply_stops_at_the_marker_spelled_in_several_tokens_and_ctrl_c_ends_it(hf_models, monkeypatch):
    """zili's tokenizers spell `<|im_end|>` with several tokens: the reply ends where the decoded text reaches it,
    and the marker is neither printed nor returned. Ctrl-C mid-reply keeps what was said."""
    import zili.infer.chat as chat_module

    _, tokenizer, template = load_chat_model(hf_models["qwen2"], device="cpu")
    ids = tokenizer.encode("fill(text)<|im_end|>\nnever shown")
    assert len(tokenizer.encode("<|im_end|>")) > 1
    monkeypatch.setattr(chat_module, "stream", lambda *a, **k: iter(ids))
    out = io.StringIO()
    said = chat_module.reply(None, tokenizer, template, [{"role": "user", "content": "x"}], Sampling(), out, 0)
    assert said == out.getvalue() == "fill(text)"

    def interrupted(*a, **k):
        yield from ids[:3]
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_module, "stream", interrupted)
    out = io.StringIO()
    said = chat_module.reply(None, tokenizer, template, [{"role": "user", "content": "x"}], Sampling(), out, 0)
    assert said == tokenizer.decode(ids[:3]) and out.getvalue() == said + " [stopped]"
