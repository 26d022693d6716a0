"""`zili eval MODEL --tasks T1,T2`: lm-evaluation-harness tasks on a zili model, through lm-eval's own evaluator.

`run_tasks` builds lm-eval's task manager (its built-in tasks plus the YAML files under `include_path`; when
every requested name is defined under `include_path` the built-in index — some 15 000 files, seconds to
walk — is skipped), runs `lm_eval.simple_evaluate` on the `zili` model class (zili.eval.harness), and
returns lm-eval's results dictionary. `results_json` serialises it as lm-eval's own command line does
(`json.dumps(..., indent=2, default=lm_eval.utils.handle_non_serializable, ensure_ascii=False)`, the
per-sample logs left out); `table` is lm-eval's `make_table` (plus the groups table when there are groups).

lm-eval is an optional dependency (`pip install 'zili[eval]'`): without it, a UserError says so. Nothing here
downloads a model; tasks whose datasets live on the Hugging Face Hub fetch them as lm-eval does, unless
`HF_DATASETS_OFFLINE=1` (then they must be cached, or local, e.g. `dataset_path: json` with `data_files`).
"""

from __future__ import annotations

import json
from pathlib import Path

from zili.errors import UserError

INSTALL = "pip install 'zili[eval]'"


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"`zili eval --tasks` needs lm-evaluation-harness, which is not installed — "
                        f"{INSTALL}") from None


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager for `tasks`: the YAML files under `include_path` alone when they define every one
    of `tasks`, else those and lm-eval's built-in tasks. UserError for a name neither knows."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path {include_path} is not a directory — pass the directory holding your task "
                            "YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [name for name in tasks if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)} — see `lm_eval ls tasks`, or pass "
                        "--include-path DIR with their YAML files")
    return manager


def run_tasks(model_path: str | Path, tasks: list[str], *, include_path: str | Path | None = None,
              limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
              device: str = "auto", step: int | None = None, max_length: int | None = None,
              apply_chat_template: bool = False, log_samples: bool = False) -> dict:
    """lm-eval's results dictionary for the model at `model_path` (run directory or Hugging Face directory) on
    `tasks` (`limit`: documents per task, or a fraction below 1). With `log_samples` it holds "samples" too."""
    _require_lm_eval()
    if not tasks:
        raise UserError("--tasks is empty — name at least one lm-eval task, e.g. --tasks hellaswag")
    if not Path(model_path).exists():
        raise UserError(f"model {model_path} not found — pass a run directory (`zili train`) or a Hugging Face "
                        "model directory")
    manager = task_manager(tasks, include_path)
    import lm_eval

    import zili.eval.harness  # noqa: F401  (registers the "zili" model class)

    model_args = {"pretrained": str(model_path), "step": step, "max_length": max_length}
    return lm_eval.simple_evaluate(
        model="zili", model_args={k: v for k, v in model_args.items() if v is not None}, tasks=tasks,
        num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit, task_manager=manager,
        log_samples=log_samples, apply_chat_template=apply_chat_template)


def results_json(results: dict) -> str:
    """The results dictionary as lm-eval's command line writes it (without the per-sample logs)."""
    from lm_eval.utils import handle_non_serializable

    summary = {key: value for key, value in results.items() if key != "samples"}
    return json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False)


def table(results: dict) -> str:
    """lm-eval's results table (and its groups table, if any)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    return text + ("\n" + make_table(results, "groups") if results.get("groups") else "")
