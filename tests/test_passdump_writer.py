"""The debug tensor dump without vLLM: hooks, the writer thread, and the promise that a pass is on disk at its end."""

from __future__ import annotations

import io
import os
import threading

import pytest
import torch

import tensorlog
from tensorlog.capture.passes import PassDumpConfig, PassDumper
from tensorlog.storage import passdump


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def _dumper(tmp_path, model, *, layers=None, skip=0, warnings=None):
    cfg = PassDumpConfig(str(tmp_path / "dump"), layers, skip)
    warn = (warnings if warnings is not None else []).append
    return PassDumper(model, cfg, tp=0, pp=0, rank=0, warn=warn)


def _run_pass(dumper, model, x):
    dumper.begin()
    with torch.no_grad():
        model(x)
    dumper.end()


def test_a_pass_is_written_off_the_models_thread_and_is_on_disk_when_its_end_returns(tmp_path, monkeypatch):
    writers: list[int] = []
    real = passdump.write_atomic

    def spy(path, chunks):  # the real write, noting which thread made it
        writers.append(threading.get_ident())
        return real(path, chunks)

    monkeypatch.setattr(passdump, "write_atomic", spy)
    model = _Model().eval()
    dumper = _dumper(tmp_path, model, layers={1}, skip=1)
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    try:
        for i in range(3):
            _run_pass(dumper, model, x + i)
            files = sorted(p.name for p in dumper.dir.iterdir())
            assert files == [f"Pass{k:05d}.pt" for k in range(1, i + 1)]  # pass 0 skipped; this pass's file is there
    finally:
        dumper.remove()
    assert len(writers) == 2 and threading.get_ident() not in writers
    assert dumper.dir.name == f"TP0_PP0_Rank0_pid{os.getpid()}"

    with torch.no_grad():  # the file holds exactly torch.save of the leaves' outputs, in call order
        h = model.layers[1].proj(model.layers[0](x + 2))
        expected = {"layers.1.proj": h, "layers.1.act": torch.relu(h), "norm": model.norm(torch.relu(h))}
    data = io.BytesIO()
    torch.save(expected, data)
    assert (dumper.dir / "Pass00002.pt").read_bytes() == data.getvalue()
    assert tensorlog.load_run(tmp_path / "dump").layout == "pass-dump"


def test_a_write_that_fails_stops_the_dump_with_one_warning_and_never_reaches_the_model(tmp_path):
    model = _Model().eval()
    warnings: list[str] = []
    dumper = _dumper(tmp_path, model, warnings=warnings)
    x = torch.ones(1, 4)
    try:
        _run_pass(dumper, model, x)
        target = dumper.dir
        for p in target.iterdir():
            p.unlink()
        target.rmdir()
        target.write_text("not a directory")  # every later write fails
        for _ in range(3):
            _run_pass(dumper, model, x)
    finally:
        dumper.remove()
    assert len(warnings) == 1 and warnings[0].startswith("debug tensor dump stopped: NotADirectoryError")
    assert dumper.pass_index == 4


def test_a_hook_that_fails_keeps_its_pass_and_stops_the_later_ones(tmp_path):
    class _Meta(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.empty(1, device="meta")  # no copy to the CPU exists

    class _Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.meta, self.b = torch.nn.Linear(4, 4), _Meta(), torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.meta(x)
            return self.b(self.a(x))

    model = _Model()
    warnings: list[str] = []
    dumper = _dumper(tmp_path, model, warnings=warnings)
    try:
        for _ in range(2):
            _run_pass(dumper, model, torch.ones(1, 4))
    finally:
        dumper.remove()
    assert sorted(p.name for p in dumper.dir.iterdir()) == ["Pass00000.pt"]
    assert set(torch.load(dumper.dir / "Pass00000.pt", weights_only=True)) == {"a", "b"}
    assert len(warnings) == 1 and warnings[0].startswith("debug tensor dump stopped: NotImplementedError")


def test_a_closed_writer_returns_at_once(tmp_path):
    writer = passdump.PassWriter(tmp_path / "rank")
    writer.write(0, {"a": torch.ones(2)})
    writer.close()
    writer.close()
    writer.write(1, {"a": torch.ones(2)})  # nothing left to write it: returns, writes nothing
    assert sorted(p.name for p in writer.dir.iterdir()) == ["Pass00000.pt"]


def test_the_env_config_names_every_bad_value(monkeypatch):
    monkeypatch.setenv("VLLM_DEBUG_TENSOR_DUMP_OUTPUT_FOLDER", "/tmp/x")
    monkeypatch.setenv("VLLM_DEBUG_TENSOR_DUMP_LAYERS", "1,a")
    with pytest.raises(tensorlog.ConfigError, match="'1,a'"):
        PassDumpConfig.from_env()
    monkeypatch.setenv("VLLM_DEBUG_TENSOR_DUMP_LAYERS", "0, 2")
    cfg = PassDumpConfig.from_env()
    assert cfg is not None and cfg.layers == {0, 2} and cfg.skip_passes == 0
    assert cfg.wants("model.layers.2.mlp") and not cfg.wants("model.layers.1.mlp") and cfg.wants("lm_head")
