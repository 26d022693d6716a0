"""The GPU check: one command that exercises zili on one CUDA GPU, measures it against a peer in the same run, and
writes one JSON file plus a short summary — within a fixed time budget. Run it through benchmarks/gpu_check.sh.

Parts, each a subprocess with its own time limit; a part that fails, crashes or runs out of time is recorded as
{"ok": false, "error": "..."} and the parts after it still run:

  env    the device, torch, CUDA, Python and package versions (benchmarks/gpu_env.py)
  tests  `pytest tests/gpu -m gpu`: the model on CUDA in bf16 against a CPU fp32 reference, SDPA and flash-attn
         attention, torch.compile against eager, exact resume of a CUDA `zili train` run, and a CPU-written
         checkpoint resumed on CUDA
  bench  `zili bench --workload dense-1b --dtype bf16 --compile`: tokens/s, MFU, peak memory
  peer   benchmarks/gpu_peer.py: transformers' LlamaForCausalLM on the same shape, steps and timing

then `ratio` = zili tokens/s ÷ peer tokens/s, when bench and peer both ran on the same workload, batch, sequence,
dtype, compile setting and steps.

Time: `--budget` seconds (default BUDGET_S) for all parts together. Each part has a limit of its own
(`limit_s`, set in `build_parts`) and gets at most what the budget leaves once the floors (`floor_s`) of the
parts still to come are set aside: the parts never run longer than the budget together, and a part that hangs
cannot push those after it below their floors. A part that runs out of time is killed with its whole process
group (a pytest run takes its `zili train` children with it), and so is the running part when the check itself
is interrupted (Ctrl-C or SIGTERM).

Output: the JSON (`--out`, default gpu_check.json in $OUT if set, else in the current directory) is rewritten
after every part, so an interrupted check still leaves what it measured. It holds the device, torch, CUDA and
Python versions, the settings, `parts` (per part: ok, error, seconds, time_limit_s, figures) and `ratio`. Each
part's full output goes to FILES/PART.log next to it (FILES = the JSON's name without .json, plus -files), with
its result file (env.json, tests.xml, bench.json, peer.json). Exit status: 0 when every part that ran is ok,
1 otherwise, 2 for a usage error or a missing dependency (nothing run).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # 8 minutes is the limit for the whole command; 30 s are left for Python, wheels and the JSON
LOG_TAIL_LINES = 25  # of a failed part's output, kept in its "error"


@dataclass(frozen=True)
class Part:
    """One part of the check. `command` runs in the repository root; it writes `result_file` (a name inside
    the files directory), from which `read(path)` returns (figures, problem) — problem is None, or a line saying
    why the part is not ok although it exited 0. `limit_s`/`floor_s`: seconds, see the module doc."""

    name: str
    command: list[str]
    result_file: str
    read: Callable[[Path], tuple[dict, str | None]]
    limit_s: float
    floor_s: float


# ---- reading each part's result --------------------------------------------------------------------------------

def read_env(path: Path) -> tuple[dict, str | None]:
    return json.loads(path.read_text()), None


BENCH_FIGURES = ("device", "chip", "workload", "params", "batch", "seq_len", "dtype", "compile", "steps", "warmup",
                 "first_loss", "step_s", "tokens_per_s", "tflops", "peak_tflops", "mfu", "peak_mem_gb", "a100_ratio")
PEER_FIGURES = ("peer", "transformers", "workload", "attn_implementation", "params", "zili_params", "param_dtype",
                "batch", "seq_len", "dtype", "compile", "steps", "warmup", "first_loss", "last_loss", "step_s",
                "tokens_per_s", "tflops", "peak_tflops", "mfu", "peak_mem_gb")


def read_bench(path: Path) -> tuple[dict, str | None]:
    result = json.loads(path.read_text())
    return {k: result.get(k) for k in BENCH_FIGURES}, None


def read_peer(path: Path) -> tuple[dict, str | None]:
    result = json.loads(path.read_text())
    figures = {k: result.get(k) for k in PEER_FIGURES}
    if figures["params"] != figures["zili_params"]:  # a different model would make the ratio meaningless
        return figures, f"the peer has {figures['params']} parameters, zili's workload {figures['zili_params']}"
    return figures, None


def read_junit(path: Path) -> tuple[dict, str | None]:
    """pytest's JUnit XML -> counts and, per test, outcome, seconds, message and the figures it recorded
    (`record_property`). Not ok when a test failed or none passed (e.g. all skipped: no CUDA device)."""
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        record: dict = {"outcome": "passed", "seconds": round(float(case.get("time", 0.0)), 2)}
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                record["outcome"] = "failed" if tag != "skipped" else "skipped"
                record["message"] = (element.get("message") or element.text or "").strip()[:500]
                break
        for prop in case.iter("property"):  # pytest writes str(value): numbers, lists and dicts come back
            try:
                record[prop.get("name")] = ast.literal_eval(prop.get("value"))
            except (ValueError, SyntaxError, TypeError):
                record[prop.get("name")] = prop.get("value")
        tests[name] = record
    counts = {outcome: sum(r["outcome"] == outcome for r in tests.values())
              for outcome in ("passed", "failed", "skipped")}
    figures = {**counts, "tests": tests}
    failed = [f"{name}: {r['message'].splitlines()[0] if r['message'] else ''}"
              for name, r in tests.items() if r["outcome"] == "failed"]
    if failed:
        return figures, "; ".join(failed)[:2000]
    if not counts["passed"]:
        reasons = sorted({r.get("message", "") for r in tests.values()})
        return figures, f"no test ran ({counts['skipped']} skipped: {'; '.join(reasons)[:300]})"
    return figures, None


# ---- running a part ----------------------------------------------------------------------------------------------

def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, its very last line (an exception's message, zili's `error:` line) repeated first
    so that the summary's one line shows it."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f"{text[-1] if text else '(no output)'}\nlast output:\n" + "\n".join(text[-lines:])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that `proc` leads (it was started in a session of its own) and reap `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # gone already
        pass
    proc.wait()


def run_part(part: Part, files: Path, env: dict, time_limit_s: float) -> dict:
    """Run one part with at most `time_limit_s` seconds; return its record (never raises for the part's sake)."""
    log, result = files / f"{part.name}.log", files / part.result_file
    result.unlink(missing_ok=True)  # a result left by an earlier check must not pass for this one's
    record: dict = {"ok": False, "error": None, "seconds": None, "time_limit_s": round(time_limit_s),
                    "figures": {}, "log": str(log)}
    start = time.perf_counter()
    returncode, timed_out = None, False
    try:
        with open(log, "w") as out:
            # a session of its own: on timeout the whole group goes (pytest's `zili train` children too)
            proc = subprocess.Popen(part.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=REPO, start_new_session=True)
            try:
                returncode = proc.wait(timeout=time_limit_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
            except BaseException:  # the check is interrupted: the part must not live on (holding the GPU)
                kill_group(proc)
                raise
    except OSError as e:  # the command could not start
        record["error"] = f"could not start {part.command[0]}: {e}"
        record["seconds"] = round(time.perf_counter() - start, 1)
        return record
    record["seconds"] = round(time.perf_counter() - start, 1)
    problem = None
    if result.is_file():
        try:
            record["figures"], problem = part.read(result)
        except Exception as e:  # noqa: BLE001 — a broken result is this part's failure, not the check's
            problem = f"could not read {result.name}: {type(e).__name__}: {e}"
    if timed_out:
        record["error"] = f"timed out after {time_limit_s:.0f} s (killed); {tail(log)}"
    elif returncode != 0:
        record["error"] = problem or f"exit code {returncode}: {tail(log)}"
    elif problem or not result.is_file():
        record["error"] = problem or f"exit code 0 but no {result.name} written; {tail(log)}"
    else:
        record["ok"] = True
    return record


def run_parts(parts: list[Part], files: Path, env: dict, budget_s: float,
              on_start: Callable[[str, float], None] = lambda name, limit: None,
              on_record: Callable[[str, dict], None] = lambda name, record: None) -> dict[str, dict]:
    """Run `parts` in order within `budget_s` seconds (see the module doc); `on_start(name, time limit in s)`
    before each part that has time left, `on_record(name, record)` after each."""
    records: dict[str, dict] = {}
    deadline = time.monotonic() + budget_s
    for i, part in enumerate(parts):
        reserve = sum(p.floor_s for p in parts[i + 1:])
        limit = min(part.limit_s, deadline - time.monotonic() - reserve)
        if limit < 1:
            records[part.name] = {"ok": False, "error": "no time left in the budget", "seconds": 0,
                                  "time_limit_s": 0, "figures": {}}
        else:
            on_start(part.name, limit)
            records[part.name] = run_part(part, files, env, limit)
        on_record(part.name, records[part.name])
    return records


# ---- the check ---------------------------------------------------------------------------------------------------

def build_parts(opts: argparse.Namespace, files: Path) -> list[Part]:
    """The parts to run, in order, with the options' settings (skipped ones left out)."""
    py = opts.python
    shape = [*(["--batch", str(opts.batch)] if opts.batch else []), *(["--seq", str(opts.seq)] if opts.seq else []),
             "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--device", opts.device, "--dtype", "bf16",
             "--workload", opts.workload]
    parts = [
        Part("env", [py, "benchmarks/gpu_env.py", opts.device, str(files / "env.json")], "env.json", read_env,
             limit_s=60, floor_s=15),
        # 9 CUDA tests: the compile test compiles a small model, the two resume tests start 5 `zili train` runs
        Part("tests", [py, "-m", "pytest", "tests/gpu", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs",
                       "--strict-markers", f"--junitxml={files / 'tests.xml'}",
                       "-o", "junit_family=xunit1"],  # the flavour that keeps the tests' record_property figures
             "tests.xml", read_junit, limit_s=210, floor_s=90),
        # dense-1b: compiling the block (forward and backward) takes about a minute, the steps seconds
        Part("bench", [py, "-m", "zili", "bench", *shape, *(["--compile"] if opts.compile else []),
                       "--json", str(files / "bench.json")], "bench.json", read_bench, limit_s=150, floor_s=90),
        Part("peer", [py, "benchmarks/gpu_peer.py", *shape, "--compile" if opts.compile else "--no-compile",
                      "--json", str(files / "peer.json")], "peer.json", read_peer, limit_s=150, floor_s=90),
    ]
    return [p for p in parts if p.name not in opts.skip]


def ratio(records: dict[str, dict]) -> dict:
    """zili tokens/s ÷ peer tokens/s, when both parts ran on the same shape and settings; else why not."""
    bench, peer = records.get("bench"), records.get("peer")
    if not (bench and peer and bench["ok"] and peer["ok"]):
        return {"zili_over_peer": None, "why_none": "needs the bench and peer parts, both ok"}
    b, p = bench["figures"], peer["figures"]
    differing = [k for k in ("workload", "batch", "seq_len", "dtype", "compile", "steps") if b.get(k) != p.get(k)]
    if differing:
        return {"zili_over_peer": None, "why_none": f"bench and peer differ in {', '.join(differing)}"}
    return {"zili_over_peer": b["tokens_per_s"] / p["tokens_per_s"], "zili_tokens_per_s": b["tokens_per_s"],
            "peer_tokens_per_s": p["tokens_per_s"], "zili_mfu": b["mfu"], "peer_mfu": p["mfu"],
            "zili_peak_mem_gb": b["peak_mem_gb"], "peer_peak_mem_gb": p["peak_mem_gb"],
            "first_loss": {"zili": b["first_loss"], "peer": p["first_loss"]}}


def assemble(opts: argparse.Namespace, records: dict[str, dict], seconds: float, started: str) -> dict:
    """The check's JSON: versions from the env part, the settings, every part's record (skipped ones marked) and
    the ratio; `ok` when every part that ran is ok."""
    skipped = sorted(set(opts.skip))
    env = records.get("env", {}).get("figures", {})
    ran = list(records.values())
    return {
        "check": "zili gpu_check",
        "started": started,
        "seconds": round(seconds, 1),
        "ok": bool(ran) and all(r["ok"] for r in ran),
        "device": env.get("device"), "chip": env.get("chip"), "torch": env.get("torch"), "cuda": env.get("cuda"),
        "python": env.get("python"), "transformers": env.get("transformers"), "flash_attn": env.get("flash_attn"),
        "settings": {"device": opts.device, "workload": opts.workload, "batch": opts.batch, "seq": opts.seq,
                     "steps": opts.steps, "warmup": opts.warmup, "compile": opts.compile, "budget_s": opts.budget,
                     "skipped": skipped, "wheels": opts.installed_wheels},
        "parts": {**records, **{name: {"skipped": True} for name in skipped}},
        "ratio": ratio(records),
    }


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def describe(name: str, record: dict) -> str:
    """One line of the summary for a part."""
    if record.get("skipped"):
        return f"  {name:<6} skipped"
    head = f"  {name:<6} {'ok' if record['ok'] else 'FAILED':<6} {record['seconds'] or 0:>5.0f} s  "
    f = record.get("figures") or {}
    if name == "env" and f:
        text = (f"{f.get('device') or 'device unknown'}, torch {f.get('torch')}, CUDA {f.get('cuda')}, "
                f"Python {f.get('python')}")
    elif name == "tests" and "passed" in f:
        text = f"{f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped"
    elif name in ("bench", "peer") and f.get("tokens_per_s"):
        who = "zili" if name == "bench" else f"transformers {f.get('transformers')} LlamaForCausalLM"
        mfu = "unknown" if f.get("mfu") is None else f"{100 * f['mfu']:.1f} %"
        text = (f"{who}: {f['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, peak {f['peak_mem_gb']:.1f} GB "
                f"({f['batch']} x {f['seq_len']}, {f['dtype']}{', compiled' if f['compile'] else ''})")
    else:
        text = ""
    if not record["ok"]:
        text = (text + "  " if text else "") + (record.get("error") or "").splitlines()[0][:160]
    return head + text


def summary(data: dict, out: Path) -> str:
    verdict = "all ok" if data["ok"] else "SOME PARTS FAILED"
    lines = [f"zili GPU check: {data['device'] or 'device unknown'} | torch {data['torch']} | CUDA {data['cuda']} | "
             f"{data['seconds']:.0f} s | {verdict}"]
    lines += [describe(name, record) for name, record in data["parts"].items()]
    r = data["ratio"]
    if r["zili_over_peer"] is not None:
        lines.append(f"  ratio  zili tokens/s / peer tokens/s = {r['zili_over_peer']:.3f}")
    else:
        lines.append(f"  ratio  none: {r['why_none']}")
    lines.append(f"JSON: {out}  (logs: {out.with_name(out.stem + '-files')}/)")
    return "\n".join(lines)


PARTS_HELP = """parts (each in its own subprocess and time limit; a failure is recorded and the others still run):
  env    device, torch, CUDA, Python, package versions
  tests  pytest tests/gpu -m gpu: bf16 CUDA model vs CPU fp32, SDPA and flash-attn attention, torch.compile vs
         eager, exact resume of a CUDA `zili train` run, a CPU-written checkpoint resumed on CUDA
  bench  zili bench --workload dense-1b --dtype bf16 --compile: tokens/s, MFU, peak memory
  peer   transformers LlamaForCausalLM on the same shape and steps (benchmarks/gpu_peer.py),
         then ratio = zili tokens/s / peer tokens/s

The wheels (tomli-w, which zili needs) come from a directory prepared on a machine with network access:
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux2014_x86_64 -d .whl tomli-w==1.2.0
See BENCHMARKS.md, "GPU check"."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Check zili on one CUDA GPU: tests, a benchmark and a peer, in at most "
                                            f"--budget seconds (default {BUDGET_S}); writes one JSON file.",
                                epilog=PARTS_HELP)
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    p.add_argument("--out", type=Path, default=default_out, help=f"the JSON file (default {default_out})")
    p.add_argument("--wheels", type=Path, default=None,
                   help="install the *.whl files of this directory (pip --no-index --no-deps --target a temporary "
                        "directory, put on PYTHONPATH) before anything runs")
    p.add_argument("--skip", action="append", default=[], choices=("tests", "bench", "peer"),
                   help="leave this part out (repeatable)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    p.add_argument("--device", default="cuda", help="device of bench and peer (default cuda; cpu with a small "
                   "--workload is a smoke test of the check itself; tests always need CUDA)")
    p.add_argument("--workload", default="dense-1b", help="zili bench workload of bench and peer (default dense-1b)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step, both sides (default: the workload's; "
                   "lower it identically on both sides if memory is short)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence, both sides (default: the workload's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps of bench and peer (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile in bench and peer (default on)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the parts (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="install the wheels, check the dependencies, print the "
                   "commands and their time limits, and stop")
    opts = p.parse_args(argv)
    if opts.steps < 1 or opts.warmup < 1 or opts.budget <= 0:
        p.error("need --steps >= 1, --warmup >= 1 and --budget > 0")
    opts.installed_wheels = []  # names of the wheels installed (main)
    return opts


def stop(message: str) -> None:
    """A usage or setup error: one line on stderr, exit status 2, nothing run."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def part_env(site: Path | None) -> dict:
    """The environment of every part: zili from this checkout (and the installed wheels) on PYTHONPATH."""
    paths = [str(site)] if site else []
    paths += [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def install_wheels(python: str, wheels: Path) -> tuple[Path, list[str]]:
    """pip-install every wheel of `wheels` (offline, no dependencies) into a new temporary directory."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        stop(f"--wheels {wheels}: no *.whl files there — prepare them as BENCHMARKS.md ('GPU check') shows")
    site = Path(tempfile.mkdtemp(prefix="zili-gpu-check-site-"))
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                           *map(str, found)], capture_output=True, text=True)
    if proc.returncode:
        stop(f"installing the wheels of {wheels} failed — {' '.join(proc.stderr.split())[-500:]}")
    return site, [w.name for w in found]


def check_dependencies(python: str, env: dict) -> None:
    """Exit 2 with one line when a module every zili part needs cannot be imported by the parts."""
    proc = subprocess.run([python, "-c", "import tomli_w"], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        stop(f"the parts cannot import what zili needs ({last}) — pass --wheels DIR with a tomli-w wheel "
             "(BENCHMARKS.md, 'GPU check')")


def main(argv=None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # -> run_part's cleanup
    site = None
    if opts.wheels:
        site, opts.installed_wheels = install_wheels(opts.python, opts.wheels)
    env = part_env(site)
    check_dependencies(opts.python, env)
    out = opts.out.resolve()
    files = out.with_name(out.stem + "-files")
    parts = build_parts(opts, files)
    if opts.dry_run:
        for part in parts:
            print(f"{part.name:<6} limit {part.limit_s:.0f} s, floor {part.floor_s:.0f} s: {' '.join(part.command)}")
        print(f"budget {opts.budget:.0f} s; JSON: {out}")
        return 0
    files.mkdir(parents=True, exist_ok=True)
    started, start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    records: dict[str, dict] = {}

    def on_start(name: str, limit: float) -> None:
        print(f"[{time.perf_counter() - start:4.0f} s] {name}: running, at most {limit:.0f} s", flush=True)

    def on_record(name: str, record: dict) -> None:
        records[name] = record
        print(f"[{time.perf_counter() - start:4.0f} s] {name}: {'ok' if record['ok'] else 'FAILED'}", flush=True)
        write_json(out, assemble(opts, records, time.perf_counter() - start, started))

    print(f"zili GPU check: parts {', '.join(p.name for p in parts)} within {opts.budget:.0f} s; logs in {files}/",
          flush=True)
    run_parts(parts, files, env, opts.budget, on_start, on_record)
    data = assemble(opts, records, time.perf_counter() - start, started)
    write_json(out, data)
    print(summary(data, out))
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
