"""distributed.py: one process without torchrun; under torchrun the group gets the run's timeout and gloo on a CPU;
the precision a device computes in. (FSDP2 sharding and loading: test_scale.py; signals: test_train.py.)"""
from datetime import timedelta

import torch

import distributed


def test_without_torchrun_it_is_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with distributed.process_group("cpu") as (rank, world, device):
        assert (rank, world, device) == (0, 1, torch.device("cpu"))


def test_init_process_group_gets_the_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.setup(timeout_s=42)[:2] == (0, 2)
    assert seen == {"backend": "gloo", "timeout": timedelta(seconds=42)}


def test_each_device_computes_in_its_own_precision_unless_told():
    assert [distributed.default_dtype(d) for d in ("cpu", "cuda:1", "mps")] == [torch.float32, torch.bfloat16,
                                                                                torch.float16]
    assert not distributed.uses_bf16("auto", torch.device("cpu")) and distributed.uses_bf16("bf16", torch.device("cpu"))
    assert distributed.uses_bf16("auto", torch.device("cuda")) and not distributed.uses_bf16("fp32", torch.device("cuda"))
