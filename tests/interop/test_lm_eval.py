"""lm-evaluation-harness on zili models: the `zili` model class (zili.eval.harness) scores a tiny local task suite —
multiple choice, generation with stop strings, rolling log-likelihood over several windows — as lm-eval's own `hf`
backend scores the same Hugging Face directory: equal metrics, per-request log-likelihoods within 1e-4, the same
generated text. `zili eval --tasks` writes lm-eval's results JSON. Offline: the tasks read local JSONL files."""

from __future__ import annotations

import json

import pytest

from zili.data.tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend needs it

TASKS = ("zili_test_mc", "zili_test_gen", "zili_test_rolling")
MC = [{"question": "The text wraps", "choices": [" lines", " words", " paragraphs of text"], "answer": 0},
      {"question": "Indentation is", "choices": [" removed", " kept", " doubled"], "answer": 1},
      {"question": "A width of", "choices": [" 70", " seventy characters", " zero"], "answer": 0}]
GEN = [{"question": "What does textwrap do?", "answer": "wrap"}, {"question": "Name a module.", "answer": "textwrap"},
       {"question": "Fill the paragraph.", "answer": "fill"}]
ROLLING = [{"text": "Text wrapping and filling. The textwrap module provides some convenience functions, as well as "
                    "TextWrapper, the class that does all the work. If you are just wrapping or filling one or two "
                    "text strings, the convenience functions should be good enough."},
           {"text": "Short one."}]
YAML = {
    "zili_test_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
                    "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    # stop at a blank line or a comma (which the random models write now and then)
    "zili_test_gen": "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: answer\n"
                     "generation_kwargs:\n  until: [\"\\n\\n\", \",\"]\n  max_gen_toks: 12\n  do_sample: false\n"
                     "metric_list:\n  - metric: exact_match\n",
    "zili_test_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                         "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                         "  - metric: bits_per_byte\n",
}
MAX_LENGTH = 48  # the rolling task's long text then spans several windows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Task YAML files reading local JSONL files (no download)."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, docs in zip(TASKS, (MC, GEN, ROLLING)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {root / f'{name}.jsonl'}\ntest_split: test\n" + YAML[name])
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def evaluate(model: str, model_args: dict, task_dir, batch_size: int) -> dict:
    from lm_eval.tasks import TaskManager

    import zili.eval.harness  # noqa: F401  (registers "zili")

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), limit=3,
                                   batch_size=batch_size, log_samples=True,
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_scores_equal_the_hf_backends(hf_models, task_dir, family):
    directory = str(hf_models[family])
    ours = evaluate("zili", {"pretrained": directory, "max_length": MAX_LENGTH}, task_dir, batch_size=4)
    theirs = evaluate("hf", {"pretrained": directory, "device": "cpu", "dtype": "float32",
                             "max_length": MAX_LENGTH}, task_dir, batch_size=1)
    for task in TASKS:
        a, b = ours["results"][task], theirs["results"][task]
        metrics = [key for key in b if key.endswith(",none") and "_stderr" not in key]
        assert metrics and sorted(metrics) == sorted(k for k in a if k.endswith(",none") and "_stderr" not in k)
        for key in metrics:
            if key.startswith(("acc", "exact_match")):
                assert a[key] == b[key], (task, key)
            else:  # perplexities: exp of log-likelihood sums that agree to ~1e-6
                assert a[key] == pytest.approx(b[key], rel=1e-5), (task, key)
        samples = {s["doc_id"]: s for s in theirs["samples"][task]}
        assert len(ours["samples"][task]) == len(samples) > 0
        for sample in ours["samples"][task]:
            mine, reference = sample["resps"], samples[sample["doc_id"]]["resps"]
            assert sample["arguments"] == samples[sample["doc_id"]]["arguments"]
            for [x], [y] in zip(mine, reference, strict=True):
                if task == "zili_test_gen":
                    assert x == y
                elif task == "zili_test_rolling":
                    assert x == pytest.approx(y, abs=1e-4)
                else:  # (log-likelihood, is greedy)
                    assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1]
    assert len(Tokenizer.load(directory).encode(ROLLING[0]["text"])) > 2 * MAX_LENGTH  # three rolling windows
    if family == "llama":  # its untied random weights write varied text: one answer is cut at a stop string
        assert any(s["resps"][0][0] for s in ours["samples"]["zili_test_gen"])


def test_cli_runs_tasks_and_writes_lm_evals_results_json(zili_cli, hf_models, task_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = zili_cli("eval", hf_models["qwen2"], "--tasks", "zili_test_mc,zili_test_gen", "--include-path", task_dir,
                    "--limit", "2", "--batch-size", "2", "--json", out)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"zili_test_mc", "zili_test_gen"}
    assert 0 <= saved["results"]["zili_test_mc"]["acc,none"] <= 1
    assert "exact_match,none" in saved["results"]["zili_test_gen"]
    assert saved["config"]["model"] == "zili" and saved["config"]["limit"] == 2 and "samples" not in saved
    assert "zili_test_mc" in proc.stdout and "|acc" in proc.stdout.replace(" ", "")  # lm-eval's table
