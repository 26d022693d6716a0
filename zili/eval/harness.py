"""The `zili` model class for lm-evaluation-harness (lm-eval): zili models — a run directory or a Hugging Face
directory — scored by lm-eval's tasks. Importing this module registers it with lm-eval under the name "zili":

    import zili.eval.harness
    lm_eval.simple_evaluate(model="zili", model_args={"pretrained": "runs/x"}, tasks=[...])

Model arguments: `pretrained` (the directory), `step` (a run's checkpoint; default the newest), `device`
(default auto), `batch_size` (sequences per forward in loglikelihood requests; "auto" means 16), `max_length`
(the context window; default the model's max_seq_len), `max_gen_toks` (default 256), `add_bos_token` and
`prefix_token_id` (as lm-eval's `hf` backend takes them), `seed` (of sampled generations).

Scores agree with lm-eval's `hf` backend on the same model (tests/interop/test_lm_eval.py), because every
tokenization choice is the same:

- Text is encoded as a transformers tokenizer encodes it by default: with the tokenizer's post-processor
  (`add_special_tokens=True`, so a tokenizer whose tokenizer.json adds BOS adds it here too), truncation and
  padding off; `add_bos_token` overrides it as in `hf`; a string that already starts with the prefix token's
  text is encoded without special tokens.
- Context/continuation pairs go through lm-eval's own `TemplateLM.loglikelihood` (this class inherits it):
  trailing spaces of the context move to the continuation, the pair is encoded whole and split at the length
  of the context's encoding; an empty context becomes the prefix token (BOS if the tokenizer config names one,
  else EOS — or `prefix_token_id`).
- A request scores `(context + continuation)[-(max_length + 1):][:-1]` as input — left-truncated to the
  window — and sums the log-softmax (fp32) of the continuation tokens; `is_greedy` is whether the argmax at
  every continuation position is the continuation token.
- `loglikelihood_rolling` cuts each text into lm-eval's own rolling windows (`lm_eval.utils.
  get_rolling_token_windows` with the prefix token, `max_length` and context length 1, made disjoint by
  `make_disjoint_window`): every token is predicted once, the first from the prefix token, and each window has
  the most context the model's length allows; a text's log-likelihood is the sum over its windows.
- `generate_until` encodes the context like the `hf` backend (special tokens added unless it starts with the
  BOS text), keeps its last `max_length - max_gen_toks` tokens, generates with the KV cache
  (zili.infer.generate: greedy unless `do_sample` with a temperature > 0, then temperature and top-p; other
  sampling settings are ignored) until EOS, a stop string of `until` (EOS's text is always one) appears in the
  decoded continuation, or `max_gen_toks` tokens; the answer is the continuation decoded without special
  tokens, cut at the first occurrence of each stop string in turn.

Efficiency: loglikelihood requests with identical inputs (e.g. multiple-choice answers of one token after the
same context) share one forward; the rest are sorted longest first and scored `batch_size` at a time, right-
padded (a causal model's real positions do not see the padding). Generation runs one request at a time.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval lists its own models only while its registry is empty: first)
import lm_eval.utils
import tokenizers
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from zili.data.chat import render
from zili.errors import UserError
from zili.infer.chat import load_chat_model
from zili.infer.generate import stream

AUTO_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's aliases


@register_model("zili")
class ZiliLM(TemplateLM):
    """A zili model (a run directory or a Hugging Face directory) as an lm-eval LM; arguments in the module doc."""

    def __init__(self, pretrained: str, step: int | None = None, device: str | None = None,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, seed: int = 0):
        super().__init__()
        del max_batch_size  # lm-eval passes it for batch_size="auto"; the batch size here is fixed
        self.path = Path(pretrained)
        if not self.path.exists():
            raise UserError(f"model {self.path} not found — pass a run directory (`zili train`) or a Hugging Face "
                            "model directory")
        self.model, self.zili_tokenizer, self.template = load_chat_model(
            self.path, None if step is None else int(step), device or "auto")
        self._device = next(self.model.parameters()).device
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = AUTO_BATCH_SIZE
        self.batch_size = max(1, int(batch_size or 1))
        limit = self.model.args.max_seq_len
        self._max_length = int(max_length) if max_length else limit
        if not 1 <= self._max_length <= limit:
            raise UserError(f"max_length {self._max_length} is outside the model's window [1, {limit}] — use at "
                            f"most {limit}")
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        # what a transformers tokenizer does by default: tokenizer.json's post-processor, no truncation or padding
        self._encoder = tokenizers.Tokenizer.from_str(self.zili_tokenizer.backend.to_str())
        self._encoder.no_truncation()
        self._encoder.no_padding()
        self.bos_token = self.template.special_tokens.get("bos_token") or None
        self.bos_token_id = self._encoder.token_to_id(self.bos_token) if self.bos_token else None
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)

    # ---- what lm-eval reads ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.zili_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling text start from: `prefix_token_id`, else BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.bos_token_id if self.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template.source if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render(self.template, chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "model_path": str(self.path)}

    # ---- tokens ---------------------------------------------------------------------------------------
    def _encode(self, string: str, add_special_tokens: bool) -> list[int]:
        ids = self._encoder.encode(string, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and ids[:1] != [
                self.bos_token_id]:  # asked for BOS where tokenizer.json's post-processor adds none
            ids = [self.bos_token_id, *ids]
        return ids

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of `string`; `add_special_tokens` None: the tokenizer's default, or `add_bos_token` when set,
        and none when the string starts with the prefix token's text."""
        if add_special_tokens is None:
            prefix = self.tok_decode([self.prefix_token_id], skip_special_tokens=False)
            add_special_tokens = (self.add_bos_token is not False) and not (prefix and string.startswith(prefix))
        ids = self._encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self._encoder.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- scoring --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None
                              ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether it is the greedy one) per request
        `((context, continuation) or None, context ids, continuation ids)`."""
        inputs: dict[tuple[int, ...], list[int]] = {}  # distinct inputs -> the requests that share them
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"request {i}: needs a context, and a continuation of 1..{self.max_length} tokens")
            window = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            inputs.setdefault(window, []).append(i)
        order = sorted(inputs, key=lambda window: (-len(window), window))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batch_size = override_bs or self.batch_size
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = torch.full((len(chunk), len(chunk[0])), self.eot_token_id, dtype=torch.long)
                for row, window in enumerate(chunk):
                    batch[row, : len(window)] = torch.tensor(window)
                logits = self.model(batch.to(self._device))
                for row, window in enumerate(chunk):
                    for i in inputs[window]:
                        results[i] = self._score(logits[row], len(window), requests[i][2])
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                        bar.update(1)
        return results

    def _score(self, logits: torch.Tensor, length: int, continuation: list[int]) -> tuple[float, bool]:
        """The continuation's log-likelihood and greediness from one row's logits over an input of `length`."""
        picked = torch.log_softmax(logits[length - len(continuation) : length].float(), dim=-1)
        target = torch.tensor(continuation, device=picked.device)
        greedy = bool((picked.argmax(dim=-1) == target).all())
        return float(picked.gather(-1, target[:, None]).sum()), greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, over lm-eval's rolling windows (see the module doc)."""
        windows, owners = [], []
        for i, (string,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
            for pair in lm_eval.utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *lm_eval.utils.make_disjoint_window(pair)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=True)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context (see the module doc), one request at a time."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        answers = []
        for i, (context, gen_kwargs) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm,
                                                       desc="Running generate_until requests")):
            until, max_new, temperature, top_p = _generation_settings(gen_kwargs, self.max_gen_toks)
            until = until + [eos] if eos and eos not in until else until
            if max_new >= self.max_length:
                raise UserError(f"max_gen_toks {max_new} leaves no room for a context in the model's window of "
                                f"{self.max_length} tokens — ask for fewer new tokens")
            add = not (self.bos_token and context.startswith(self.bos_token)) and self.add_bos_token is not False
            prompt = self._encode(context, add)[-(self.max_length - max_new):] or [self.prefix_token_id]
            new: list[int] = []
            for token in stream(self.model, prompt, max_new, temperature, top_p, self.seed + i,
                                eos_id=self.eot_token_id):
                new.append(token)
                if token == self.eot_token_id:
                    break
                so_far = self.tok_decode(new, skip_special_tokens=False)  # special tokens spelled, as hf checks
                if any(stop and stop in so_far for stop in until):
                    break
            text = self.tok_decode(new)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return answers


def _generation_settings(gen_kwargs: dict, default_max: int) -> tuple[list[str], int, float, float]:
    """(stop strings, most new tokens, temperature — 0 = greedy —, top-p) of a request's generation kwargs."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = next((int(gen_kwargs[k]) for k in MAX_TOKEN_KEYS if gen_kwargs.get(k) is not None), default_max)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    top_p = float(gen_kwargs.get("top_p") or 1.0)
    return until, max_new, temperature, top_p
