"""`zili` command line: argument parsing only, then calls into the packages.

User errors (zili.errors.UserError) print one line, `error: what is wrong — how to fix it`, and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zili.errors import UserError

DESCRIPTION = """zili: train large language models on any accelerator.

  zili train [--config F] [--section.key=value ...]   train (no arguments: the CPU demo)
  zili generate RUN_DIR --prompt TEXT                  sample from a trained run
  zili chat RUN_DIR|HF_DIR [--system TEXT]             talk to a model through its chat template
  zili eval RUN_DIR|HF_DIR --data DIR|FILE | --tasks T1,T2   loss, perplexity, bits/byte; lm-eval tasks
  zili data prepare --input PATHS --tokenizer DIR --output DIR
  zili data train-tokenizer --input PATHS --vocab-size N --output DIR
  zili bench [--workload NAME] [--steps N] [--json PATH]   measure a standard workload on this device
  zili bench --compare A.json B.json ... [--png F]      compare bench results side by side
  zili chips [--json]                                  the chip table (peak TFLOP/s, HBM, bandwidths)
  zili import-hf HF_DIR RUN_DIR [--mtp-depth 1]        a Hugging Face checkpoint (Llama, Qwen2, Qwen3,
                                                       Qwen3-MoE, DeepSeek-V3) -> a zili run
  zili export-hf RUN_DIR OUT_DIR [--step N]            a zili checkpoint -> a Hugging Face model directory
  zili checkpoint verify RUN_DIR|STEP_DIR [--quick]    check checkpoints against their manifests (exit 1 if
                                                       any is damaged)
  zili plan --model M --chip C --count N [--tokens 15T] [layout flags] [--calibrate B.json] [--verify] [--json]
                                                       plan a run: memory, step time, MFU, days, best layouts
  zili plan --budget-chip-hours H --chip C --count N   the compute-optimal model for a budget, and its layout
  zili report RUN_DIR [RUN_DIR ...] [--output DIR]     an HTML page of runs: charts of their metrics, overlaid,
                                                       and their configs side by side

Distributed: torchrun --nproc-per-node N -m zili train ...
Each command's options: zili COMMAND --help
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported as zili reports every user error: one line, exit 2
    (argparse's own prints the usage first). Sub-command parsers are of this class too."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} — see `{self.prog} --help`")


def _train(argv: list[str]) -> None:
    from zili.config import describe, load_config, parse_overrides
    from zili.train.launch import train

    parser = _Parser(
        prog="zili train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model. With no arguments: the demo (tiny model, Shakespeare, CPU-sized).",
        epilog="config keys (TOML sections, or --section.key=value overrides; defaults shown):\n" + describe(),
    )
    parser.add_argument("--config", help="TOML file with [section] tables; overrides apply on top")
    known, rest = parser.parse_known_args(argv)
    cfg = load_config(known.config, parse_overrides(rest))
    train(cfg)


def _generate(argv: list[str]) -> None:
    parser = _Parser(prog="zili generate", description="Generate text from a trained run's checkpoint.")
    parser.add_argument("run_dir", help="run directory (with checkpoints/ and tokenizer/)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy and deterministic (default 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--device", default="auto", help="device (default auto)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("need --max-new-tokens >= 0, --temperature >= 0 and 0 < --top-p <= 1")
    from zili.infer.run import generate_text

    print(generate_text(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                        args.step, args.device))


def _chat(argv: list[str]) -> None:
    parser = _Parser(
        prog="zili chat", description="Talk to a model (a run directory or a Hugging Face model directory) through "
        "its tokenizer's chat template. On a terminal: type a message, Ctrl-C ends a reply, Ctrl-D ends the chat. "
        "From a pipe or file: one user turn per line, one answer printed per turn.")
    parser.add_argument("model", help="run directory (checkpoints/, tokenizer/) or Hugging Face model directory")
    parser.add_argument("--system", default=None, help="system message at the start of the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy and deterministic (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the first reply (default 0)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest)")
    parser.add_argument("--device", default="auto", help="device (default auto)")
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("need --max-new-tokens > 0, --temperature >= 0 and 0 < --top-p <= 1")
    from zili.infer.chat import Sampling, chat

    chat(args.model, Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed), args.system,
         args.step, args.device)


def _eval(argv: list[str]) -> None:
    parser = _Parser(
        prog="zili eval", description="Evaluate a model (a run directory or a Hugging Face model directory). "
        "--data: loss (nats/token), perplexity and bits per byte on a prepared dataset's validation split or on a "
        "text file. --tasks: lm-evaluation-harness tasks through lm-eval's own evaluator (pip install "
        "'zili[eval]'); prints lm-eval's table.")
    parser.add_argument("model", help="run directory (checkpoints/, tokenizer/) or Hugging Face model directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="a directory `zili data prepare` wrote (its validation split), or a UTF-8 "
                      "text file")
    what.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="--data: tokens per sequence (default: the run's "
                        "training.seq_len; for a Hugging Face model its max_seq_len, at most 2048)")
    parser.add_argument("--max-batches", type=int, default=None, help="--data: stop after N batches (default: all)")
    parser.add_argument("--val-fraction", type=float, default=None, help="--data DIR: the held-out share, as "
                        "data.val_fraction (default: the run's, else 0.01)")
    parser.add_argument("--include-path", default=None, help="--tasks: a directory of lm-eval task YAML files")
    parser.add_argument("--limit", type=float, default=None, help="--tasks: documents per task (below 1: a fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: each "
                        "task's own)")
    parser.add_argument("--apply-chat-template", action="store_true", help="--tasks: render prompts with the "
                        "model's chat template")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this file (--tasks: "
                        "lm-eval's results dictionary, as lm-eval writes it)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest)")
    parser.add_argument("--device", default="auto", help="device (default auto)")
    args = parser.parse_args(argv)
    data_only = {"--seq-len": args.seq_len, "--max-batches": args.max_batches, "--val-fraction": args.val_fraction}
    tasks_only = {"--include-path": args.include_path, "--limit": args.limit, "--num-fewshot": args.num_fewshot,
                  "--apply-chat-template": args.apply_chat_template or None}
    wrong = [flag for flag, value in (tasks_only if args.data else data_only).items() if value is not None]
    if wrong:
        one = len(wrong) == 1
        raise UserError(f"{', '.join(wrong)} go{'es' if one else ''} with {'--tasks' if args.data else '--data'}, not "
                        f"{'--data' if args.data else '--tasks'} — leave {'it' if one else 'them'} out")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.json_path and not Path(args.json_path).resolve().parent.is_dir():
        raise UserError(f"--json {args.json_path}: its directory does not exist — create it first")
    from zili.fsio import atomic_write_text

    if args.data:
        from zili.eval.perplexity import evaluate_data

        result = evaluate_data(args.model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                               max_batches=args.max_batches, val_fraction=args.val_fraction, step=args.step,
                               device=args.device)
        print(result.table())
        if args.json_path:
            atomic_write_text(Path(args.json_path), result.to_json())
        return
    from zili.eval.tasks import results_json, run_tasks, table

    if (args.limit is not None and args.limit <= 0) or (args.num_fewshot is not None and args.num_fewshot < 0):
        raise UserError("--limit must be positive and --num-fewshot at least 0")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    results = run_tasks(args.model, tasks, include_path=args.include_path, limit=limit, num_fewshot=args.num_fewshot,
                        batch_size=args.batch_size, device=args.device, step=args.step,
                        apply_chat_template=args.apply_chat_template)
    print(f"zili ({args.model}), limit: {limit}, num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}")
    print(table(results))
    if args.json_path:
        atomic_write_text(Path(args.json_path), results_json(results))


def _data(argv: list[str]) -> None:
    parser = _Parser(prog="zili data", description="Prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text/JSONL/Parquet files into token shards plus a manifest",
                          description="Tokenize files into token shards plus a manifest. Inputs by name: .jsonl "
                                      "(one document per line), .parquet (one per row), any other file one "
                                      "document; .gz and .zst files are decompressed (.jsonl.gz, .txt.zst, ...); "
                                      "directories are read recursively in sorted order. Parquet and zstd need "
                                      "pip install 'zili[data]'. A progress bar goes to stderr when it is a "
                                      "terminal.")
    prep.add_argument("--input", nargs="+", required=True,
                      help="files or directories (.jsonl[.gz|.zst]: one document per line; .parquet: one per row)")
    prep.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    prep.add_argument("--output", required=True, help="new directory for shards and manifest.json")
    prep.add_argument("--text-key", default="text",
                      help="JSONL field or Parquet column holding the text (default 'text')")
    prep.add_argument("--workers", type=int, default=None,
                      help="tokenizing processes (default: one per CPU core from 4 cores, at most 32; below 4 "
                           "cores, 1: this process only); the output is the same for any number")
    prep.add_argument("--format", choices=("text", "chat"), default="text",
                      help="text (default): documents for pretraining; chat: conversations {\"messages\": [...]} "
                           "rendered with the tokenizer's chat template, the loss on the assistant tokens "
                           "(for training.objective=sft; docs/post-training.md)")
    tok = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text/JSONL files")
    tok.add_argument("--input", nargs="+", required=True, help="files or directories")
    tok.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    tok.add_argument("--output", required=True, help="directory to write tokenizer.json into")
    tok.add_argument("--text-key", default="text",
                     help="JSONL field or Parquet column holding the text (default 'text')")
    tok.add_argument("--chat-tokens", action="store_true",
                     help="add the chat markers <|im_start|> and <|im_end|> as single tokens (for chat data)")
    tok.add_argument("--split-digits", action="store_true",
                     help="split numbers into single digits before BPE (as Qwen2 does; helps arithmetic)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from zili.data.prepare import default_workers, prepare

        workers = default_workers() if args.workers is None else args.workers
        manifest = prepare(args.input, args.tokenizer, args.output, text_key=args.text_key, workers=workers,
                           progress=True, format=args.format)
        trained = f", {manifest['trained_tokens']} of them trained on" if args.format == "chat" else ""
        print(f"wrote {manifest['total_tokens']} tokens{trained} in {len(manifest['shards'])} shard(s) to "
              f"{args.output}")
    else:
        from zili.data.chat import CHAT_TOKENS
        from zili.data.documents import find_files, read_documents
        from zili.data.tokenizer import train_bpe
        from zili.fsio import check_writable

        if Path(args.output).exists() and not Path(args.output).is_dir():  # checked before the training, not after
            raise UserError(f"--output {args.output} is a file — pass a directory to write tokenizer.json into")
        check_writable(Path(args.output), "--output")
        tokenizer = train_bpe(read_documents(find_files(args.input), args.text_key), args.vocab_size,
                              special_tokens=CHAT_TOKENS if args.chat_tokens else (),
                              individual_digits=args.split_digits)
        tokenizer.save(args.output)
        print(f"wrote a {tokenizer.vocab_size}-token tokenizer to {args.output}")


def _import_hf(argv: list[str]) -> None:
    parser = _Parser(prog="zili import-hf",
                                     description="Convert a Hugging Face LlamaForCausalLM, Qwen2ForCausalLM, "
                                                 "Qwen3ForCausalLM, Qwen3MoeForCausalLM or DeepseekV3ForCausalLM "
                                                 "directory (config.json, *.safetensors — block-quantized FP8 "
                                                 "included — and tokenizer files) into a zili run directory.")
    parser.add_argument("hf_dir", help="Hugging Face model directory")
    parser.add_argument("run_dir", help="run directory to write (tokenizer/ and checkpoints/step-0000000/)")
    parser.add_argument("--mtp-depth", type=int, default=0, choices=(0, 1),
                        help="1: also load DeepSeek-V3's multi-token-prediction layer (default 0: skip it)")
    args = parser.parse_args(argv)
    from zili.interop.import_hf import import_hf

    print(f"wrote {import_hf(args.hf_dir, args.run_dir, args.mtp_depth)}")


def _export_hf(argv: list[str]) -> None:
    parser = _Parser(prog="zili export-hf",
                                     description="Write a zili checkpoint (written by any number of ranks) "
                                                 "as a Hugging Face model directory that transformers loads as it is.")
    parser.add_argument("run_dir", help="run directory (checkpoints/ and tokenizer/)")
    parser.add_argument("out_dir", help="directory to write (replaced if it exists)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (auto: the imported weights' dtype, else float32)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="largest safetensors file, 1e9 bytes (default 5)")
    args = parser.parse_args(argv)
    if args.max_shard_gb <= 0:
        raise UserError("--max-shard-gb must be positive")
    from zili.interop.export_hf import export_hf

    print(f"wrote {export_hf(args.run_dir, args.out_dir, args.step, args.dtype, int(args.max_shard_gb * 1e9))}")


def _checkpoint(argv: list[str]) -> None:
    parser = _Parser(prog="zili checkpoint", description="Inspect a run's checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every checkpoint against its manifest.json",
                            description="Check every checkpoint of a run (or one step-NNNNNNN directory) against its "
                                        "manifest.json: each file present, with its size and sha256. Prints one line "
                                        "per checkpoint (ok, or what is wrong); exit status 0 if all are usable, 1 if "
                                        "any is damaged, 2 if there is no checkpoint to check. Checkpoints written "
                                        "before manifests are reported as unverified (usable).")
    verify.add_argument("path", help="run directory (with checkpoints/) or one checkpoint directory")
    verify.add_argument("--quick", action="store_true", help="sizes only, no checksums (reads no file data)")
    args = parser.parse_args(argv)
    from zili import checkpoint

    path = Path(args.path)
    if any((path / name).is_file() for name in ("manifest.json", "meta.json", ".metadata")):
        found, leftovers = [path], []
    elif path.is_dir():
        found = checkpoint.step_dirs(path)
        root = path / "checkpoints"
        leftovers = sorted(p for p in root.glob(".tmp-*") if p.is_dir()) if root.is_dir() else []
    else:
        raise UserError(f"{args.path} not found — pass a run directory or a checkpoint directory")
    if not found:
        raise UserError(f"no checkpoints in {path / 'checkpoints'} — pass a run directory `zili train` wrote")
    damaged = 0
    for step in found:
        verdict = checkpoint.verify(step, checksums=not args.quick)
        damaged += not verdict.usable
        print(verdict.describe(), flush=True)
    for leftover in leftovers:
        print(f"{leftover.name}: an unfinished save, ignored (the next save of that step removes it)")
    if damaged:
        print(f"{damaged} of {len(found)} checkpoint(s) damaged: `--checkpoint.resume=auto` skips them",
              file=sys.stderr)
        sys.exit(1)


def _chips(argv: list[str]) -> None:
    parser = _Parser(prog="zili chips", description="Print the chip table (zili/chips.toml) that MFU, "
                                                                     "bench and plan use.")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    from zili.accel import describe_chips, load_chips

    if args.json:
        import json

        print(json.dumps(load_chips(), indent=1))
    else:
        print(describe_chips())


def _bench(argv: list[str]) -> None:
    from zili.bench.workloads import WORKLOADS

    parser = _Parser(prog="zili bench", description="Measure a standard training workload on this "
                                     "device (tokens/s, TFLOP/s, MFU, peak memory, ratio to an A100-80GB), or "
                                     "compare saved results.")
    parser.add_argument("--workload", default="dense-125m", choices=list(WORKLOADS), help="default dense-125m")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the workload's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the workload's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (compilation not timed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights from this seed, as training.seed (default 0)")
    parser.add_argument("--data", default=None, help="train on the first batch of this prepared dataset (as `zili "
                        "train` would draw it) instead of random tokens")
    parser.add_argument("--json", dest="json_path", help="also write the result to this file")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="print these results side by side and chart them")
    parser.add_argument("--png", default="bench-compare.png",
                        help="chart file for --compare (default bench-compare.png)")
    args = parser.parse_args(argv)
    import json

    if args.compare:
        from zili.bench.compare import chart, read_results, table

        results = read_results(args.compare)
        print(table(results))
        print(f"chart: {chart(results, Path(args.png))}")
        return
    from zili.bench.measure import run_bench
    from zili.fsio import atomic_write_text, check_writable

    if args.json_path:  # before the measurement, not after it
        check_writable(Path(args.json_path), "--json")
    result = run_bench(args.workload, args.steps, args.warmup, args.device, args.dtype, args.batch, args.seq,
                       args.compile, args.seed, args.data)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_path:
        atomic_write_text(Path(args.json_path), text + "\n")


def _plan(argv: list[str]) -> None:
    from zili.bench.workloads import WORKLOADS
    from zili.plan.calibrate import calibrate, load_bench
    from zili.plan.planner import PlanRequest, make_plan
    from zili.plan.report import table, to_json
    from zili.plan.spec import load_cluster, load_model, parse_count

    parser = _Parser(
        prog="zili plan", description="Plan a training run before spending a chip-hour: memory per chip, step "
        "time (compute, exposed communication, pipeline bubble), MFU, tokens/s, days and chip-hours for the best "
        "parallel layouts. Layout flags left out are searched. Method and assumptions: docs/planner.md.")
    parser.add_argument("--model", default=None, help="a preset (e.g. llama3-70b, dense-1t) or a TOML model file")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the file's; 4096 "
                        "for presets)")
    parser.add_argument("--chip", required=True, help="a chip-table row (zili chips) or a TOML chip file")
    parser.add_argument("--count", type=int, required=True, help="number of chips")
    parser.add_argument("--per-node", type=int, default=8, help="chips per node / scale-up domain (default 8)")
    parser.add_argument("--tokens", default=None, help="training tokens, e.g. 15T or 300B (default 20 x parameters)")
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step (default "
                        "about 4M tokens)")
    for flag, kind, text in (("tp", int, "tensor parallel degree"), ("pp", int, "pipeline stages"),
                             ("vpp", int, "virtual stages per pipeline rank"), ("cp", int, "context parallel"),
                             ("ep", int, "expert parallel"), ("dp-shard", int, "FSDP / ZeRO shard degree"),
                             ("dp-replicate", int, "replica degree"), ("microbatch", int, "sequences per micro-batch")):
        parser.add_argument(f"--{flag}", type=kind, default=None, help=text)
    parser.add_argument("--zero", type=int, choices=(1, 2, 3), default=None, help="ZeRO stage (zili's FSDP2 is 3)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default=None)
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="sequence parallelism with tp (default: on when tp > 1)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp8"), default=None, help="compute dtype (default bf16)")
    parser.add_argument("--attention", choices=("flash", "materialized"), default=None, help="attention kernel: "
                        "flash (fused, as zili's SDPA; the default) or materialized (scores stored, as Megatron-LM "
                        "before FlashAttention)")
    parser.add_argument("--top", type=int, default=5, help="layouts to show (default 5)")
    parser.add_argument("--verify", action="store_true", help="build the real model for the best layout zili's "
                        "trainer can run, under a fake process group of the full world size, and compare its bytes "
                        "with the analytic ones")
    parser.add_argument("--budget-chip-hours", type=float, default=None, help="propose the compute-optimal model "
                        "and token count for this many chip-hours (instead of --model)")
    parser.add_argument("--moe-imbalance", type=float, default=1.0, help="mixture of experts: routed tokens of "
                        "the busiest expert rank / the mean (default 1.0, perfectly balanced)")
    parser.add_argument("--calibrate", default=None, metavar="BENCH.json", help="a `zili bench --json` result "
                        "measured on this chip: its matmul efficiency replaces the chip table's")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.moe_imbalance < 1:
        raise UserError(f"--moe-imbalance must be at least 1.0 (1.0 = balanced), got {args.moe_imbalance}")
    if (args.model is None) == (args.budget_chip_hours is None):
        raise UserError("give either --model (plan that model) or --budget-chip-hours (propose one)")
    if args.budget_chip_hours is not None and args.budget_chip_hours <= 0:
        raise UserError("--budget-chip-hours must be positive")
    for name in ("tp", "pp", "vpp", "cp", "ep", "dp_shard", "dp_replicate", "microbatch", "global_batch", "top",
                 "seq_len"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    cluster = load_cluster(args.chip, args.count, args.per_node)
    if args.calibrate:
        result = load_bench(args.calibrate)
        if result["workload"] not in WORKLOADS:
            raise UserError(f"--calibrate {args.calibrate}: unknown bench workload {result['workload']!r}")
        cluster = calibrate(cluster, result, WORKLOADS[result["workload"]].args, args.calibrate)
    model_args, seq_len = load_model(args.model, args.seq_len) if args.model else (None, args.seq_len)
    fixed = {k: getattr(args, k) for k in ("tp", "pp", "vpp", "cp", "ep", "dp_shard", "dp_replicate", "zero",
                                           "microbatch", "recompute", "sequence_parallel", "dtype", "attention")
             if getattr(args, k) is not None}
    tokens = parse_count(args.tokens, "--tokens") if args.tokens else None
    plan = make_plan(PlanRequest(cluster=cluster, model_name=args.model or "", args=model_args, seq_len=seq_len,
                                 fixed=fixed, global_batch=args.global_batch, tokens=tokens, top=args.top,
                                 verify=args.verify, budget_chip_hours=args.budget_chip_hours,
                                 moe_imbalance=args.moe_imbalance))
    print(to_json(plan) if args.json else table(plan))


def _report(argv: list[str]) -> None:
    parser = _Parser(
        prog="zili report", description="Write an HTML report of one or more runs into DIR: index.html with the "
        "runs' configs side by side (differences highlighted) and PNG charts next to it — loss and val loss, "
        "learning rate, gradient norm, tokens/s, MFU, peak memory, skipped steps, expert load and RL metrics "
        "where logged, several runs overlaid on each chart. The directory is self-contained (the page refers to "
        "its PNGs by relative name) and replaced as a whole.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl, config.toml)")
    parser.add_argument("--output", default=None, metavar="DIR", help="report directory (default RUN_DIR/report "
                        "for one run; required for several)")
    args = parser.parse_args(argv)
    from zili.report import write_report

    out = write_report(args.run_dirs, args.output)
    print(f"wrote {out / 'index.html'}")


COMMANDS = {"plan": _plan, "bench": _bench, "chips": _chips, "train": _train, "generate": _generate, "chat": _chat,
            "data": _data, "eval": _eval, "import-hf": _import_hf,
            "export-hf": _export_hf, "report": _report, "checkpoint": _checkpoint}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):  # bare `zili` prints the help, as git does (`zili train`: the demo)
        print(DESCRIPTION)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} — use one of: {', '.join(COMMANDS)} (zili --help)", file=sys.stderr)
        sys.exit(2)
    try:
        COMMANDS[command](rest)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: one line, from rank 0
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        sys.exit(0)
    except Exception as e:
        from zili.parallel.distributed import collective_failure  # torch only once a command has imported it

        line = collective_failure(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)  # from every rank that failed: each names itself
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
