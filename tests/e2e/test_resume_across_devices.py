"""Checkpoints resume on another device type: the RNG entries are device-neutral (`rng_cpu`, `rng_device`,
`rng_device_type`); the device generator comes back only on the device type that wrote it, and otherwise the run
goes on with one note line. Accelerators are stand-ins (a CPU device reporting another type, with host-memory
generator functions), so this runs anywhere, in-process and in seconds."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import TINY_MODEL
from zili import accel, checkpoint
from zili.config import load_config, parse_overrides
from zili.train.metrics import read_metrics
from zili.train.trainer import Trainer

STEPS = 4


class StandInModule:
    """What torch.cuda / torch_npu offer for generators and names, on host memory."""

    def __init__(self, device_type: str, fill: int):
        self.device_type, self.fill, self.restored = device_type, fill, []

    def get_rng_state(self, device=None) -> torch.Tensor:
        return torch.full((16,), self.fill, dtype=torch.uint8)

    def set_rng_state(self, state, device=None) -> None:
        self.restored.append(state.clone())

    def get_device_name(self, device=None) -> str:
        return f"Stand-in {self.device_type} chip"  # in no chip-table row


def trainer(tiny_dataset, run_dir, *flags: str) -> Trainer:
    return Trainer(load_config(None, parse_overrides([
        *TINY_MODEL, f"--data.dataset={tiny_dataset}", f"--training.run_dir={run_dir}", f"--training.steps={STEPS}",
        "--metrics.log_every=1", "--training.eval_every=0", "--checkpoint.keep=1",
        "--checkpoint.resume=auto", *flags])))


def on_stand_in(monkeypatch, t: Trainer, device_type: str, fill: int) -> StandInModule:
    """Put `t` on a stand-in accelerator of `device_type` (tensors stay on the CPU)."""
    module = StandInModule(device_type, fill)
    real = accel._module_for
    monkeypatch.setattr(accel, "_module_for", lambda kind: module if kind == device_type else real(kind))
    monkeypatch.setattr(accel, "_WARNED_PEAKS", set())

    class StandIn(accel.Accelerator):
        @property
        def type(self) -> str:
            return device_type

    t.accel = StandIn(torch.device("cpu"))
    return module


def saved_rng(run_dir) -> dict[str, torch.Tensor]:
    """The newest checkpoint's RNG entries, read as saved."""
    path = checkpoint.resolve(run_dir)
    saved = checkpoint._read_metadata(path).state_dict_metadata
    state = {key.removeprefix("trainer."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for key, m in saved.items() if key.startswith("trainer.rng_")}
    with warnings.catch_warnings():  # single-process DCP use is intended
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load({"trainer": state}, checkpoint_id=str(path))
    return state


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_checkpoint_of_a_cuda_run_resumes_on_cpu(tiny_dataset, tmp_path, monkeypatch, capsys):
    first = trainer(tiny_dataset, tmp_path / "run", "--training.exit_after=2")
    on_stand_in(monkeypatch, first, "cuda", fill=7)
    first.run()
    saved = saved_rng(tmp_path / "run")
    assert accel.decode_text(saved["rng_device_type"]) == "cuda" and saved["rng_device"].tolist() == [7] * 16
    monkeypatch.undo()  # back to the plain CPU
    capsys.readouterr()

    second = trainer(tiny_dataset, tmp_path / "run")
    resume = second.maybe_resume
    after_resume = {}

    def recording_resume():
        resume()
        after_resume["cpu"] = torch.get_rng_state()

    second.maybe_resume = recording_resume
    second.run()
    out = capsys.readouterr()
    assert "resumed from" in out.out and "at step 2" in out.out
    notes = [line for line in out.err.splitlines() if line.startswith("note:")]
    assert notes == ["note: the checkpoint was written on cuda and resumes on cpu: its cuda generator state does not "
                     "apply here, only the CPU generator is restored"]
    assert torch.equal(after_resume["cpu"], saved["rng_cpu"])
    assert sorted(losses(tmp_path / "run")) == list(range(1, STEPS + 1))
    assert accel.decode_text(saved_rng(tmp_path / "run")["rng_device_type"]) == "cpu"  # written anew by the CPU


def test_cpu_checkpoint_resumes_on_an_accelerator_which_restores_only_its_own_state(tiny_dataset, tmp_path,
                                                                                     monkeypatch, capsys):
    run = tmp_path / "run"
    trainer(tiny_dataset, run, "--training.exit_after=1").run()  # plain CPU: step 1
    assert accel.decode_text(saved_rng(run)["rng_device_type"]) == "cpu" and saved_rng(run)["rng_device"].numel() == 0
    capsys.readouterr()

    npu_run = trainer(tiny_dataset, run, "--training.exit_after=1")  # steps 2: on a stand-in NPU
    npu = on_stand_in(monkeypatch, npu_run, "npu", fill=3)
    npu_run.run()
    err = capsys.readouterr().err.splitlines()
    assert npu.restored == []  # a CPU run left no NPU generator state
    assert [line for line in err if line.startswith("note:")] == [
        "note: the checkpoint was written on cpu and resumes on npu: it holds no npu generator state, only the CPU "
        "generator is restored; the npu generator keeps the state training.seed gave it, so random draws on it "
        "(dropout) differ from an uninterrupted run's"]
    # the stand-in chip has no chip-table row: MFU unknown (null) with one warning, not a probe's overstatement
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "chip 'Stand-in npu chip' (npu) is not in the chip table" in warnings[0]
    assert read_metrics(run)[-1]["step"] == 2 and read_metrics(run)[-1]["mfu"] is None
    assert accel.decode_text(saved_rng(run)["rng_device_type"]) == "npu"

    again = trainer(tiny_dataset, run)  # steps 3-4: on a stand-in NPU again, whose generator state comes back
    npu_again = on_stand_in(monkeypatch, again, "npu", fill=9)
    again.run()
    assert [t.tolist() for t in npu_again.restored] == [[3] * 16]
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


def test_checkpoint_from_before_device_neutral_rng_resumes(tiny_dataset, tmp_path, monkeypatch, capsys):
    """Older CPU runs saved `rng_cpu` only."""
    run = tmp_path / "run"
    old = trainer(tiny_dataset, run, "--training.exit_after=2")
    monkeypatch.setattr(accel.Accelerator, "rng_state", lambda self: {"cpu": torch.get_rng_state()})
    old.run()
    assert set(saved_rng(run)) == {"rng_cpu"}
    monkeypatch.undo()
    whole = tmp_path / "whole"
    trainer(tiny_dataset, whole).run()
    capsys.readouterr()

    trainer(tiny_dataset, run).run()
    out = capsys.readouterr()
    assert "resumed from" in out.out and "note:" not in out.err
    assert losses(run) == losses(whole)  # and it goes on exactly as an uninterrupted run
