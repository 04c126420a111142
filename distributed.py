"""Where the computation runs: the device and the precision it computes in, the torchrun process group that training
and inference share, FSDP2 sharding, the signals that stop a training run at a step boundary, and the FLOPs of a
training step against the accelerator's peak (MFU).

One process when RANK is unset. Under torchrun every process joins one group: nccl on CUDA (each rank on GPU
LOCAL_RANK), gloo on a CPU, where FSDP2 runs too, so multi-process code is tested without a GPU.
"""
import gc
import math
import os
import signal
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """What a device computes in unless told otherwise: bf16 on CUDA, fp16 on Apple's MPS, fp32 on a CPU."""
    return {"cuda": torch.bfloat16, "mps": torch.float16}.get(torch.device(device).type, torch.float32)


def uses_bf16(precision, device) -> bool:
    """A training run's precision: "auto" is the device's own (bf16 on CUDA); "bf16" on a CPU runs the GPU's code
    path (FSDP2 mixed precision, flash attention), which is what the tests do."""
    return precision == "bf16" or precision == "auto" and default_dtype(device) == torch.bfloat16


def setup(device=None, timeout_s=None):
    """(rank, world size, device): under torchrun this process joins the group, on a CUDA device its own GPU."""
    device = torch.device(device or default_device())
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # the default (10 to 30 min) leaves a job with one hung rank idling on every other GPU for that long
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **timeout)
    return dist.get_rank(), dist.get_world_size(), device


@contextmanager
def process_group(device=None, timeout_s=None):
    """setup() for a block; the group is left at its end, after a barrier (gloo aborts when one rank tears down
    while another still talks). A model sharded in the block must be gone by then: its device mesh would keep the
    group alive past its end, and tearing that down at exit can abort the process. An exception leaves the group
    to the process's exit: a peer may be hung."""
    rank, world, device = setup(device, timeout_s)
    yield rank, world, device
    if dist.is_initialized():
        gc.collect()  # what the block freed, reference cycles included, goes before the group
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def stall_explained(timeout_s, next_step):
    """A collective that timed out (gloo raises it; NCCL's watchdog aborts the process itself) as a TimeoutError that
    says a rank stalled, and what to do: next_step()."""
    try:
        yield
    except RuntimeError as e:
        if not (dist.is_initialized() and "timed out" in str(e).lower()):
            raise
        raise TimeoutError(f"rank {dist.get_rank()}: no answer from another rank within dist_timeout={timeout_s:g} s "
                           f"(a rank stalled or died): {str(e).splitlines()[0]}\n{next_step()}") from None


def all_sum(values, device) -> list:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


# -------------------------------------------------------------------------------------------------------- FSDP2

def parallelize(model, device, *, bf16=False, grad_checkpointing=False, compile_blocks=False):
    """A LLaVA ready to train on `device`. Under torchrun each decoder block, then the root, is sharded with FSDP2
    (weights gathered in bf16 with `bf16`, gradients reduced in fp32); the frozen tower is a replica on every rank.
    A model loaded on the meta device (each parameter holding its `.source`, checkpoint.load_strict) is filled
    after sharding, each rank reading only its own rows: its peak memory is about the model / world."""
    sources = None
    if any(p.is_meta for p in model.parameters()):
        sources = {name: p.source if p.is_meta else p.detach().clone() for name, p in model.named_parameters()}
        model.to("meta")
    model.llm.gradient_checkpointing = grad_checkpointing  # the layer loop runs each block inside checkpoint()
    if compile_blocks:  # in place (parameter names unchanged), before sharding; all blocks share one compiled graph
        for block in model.llm.layers:
            block.compile()
    if dist.is_initialized():
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        # the frozen tower is a plain replica on every rank, outside FSDP and the optimizer; bf16 is enough to run it
        tower_dtype = torch.bfloat16 if bf16 else torch.float32
        model.vision_tower.to(tower_dtype) if sources else model.vision_tower.to(device, tower_dtype)
        for i, block in enumerate(model.llm.layers):
            # the last block is needed again first thing in backward: keep it gathered (as torchtitan does)
            fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(model.llm.layers) - 1)
        fully_shard(model, mp_policy=policy, ignored_params=set(model.vision_tower.parameters()))
    elif sources is None:
        model.to(device)
    return model if sources is None else fill(model, sources, device)


@torch.no_grad()
def fill(model, sources, device):
    """Allocate a meta model's parameters on `device` and copy in their sources: of an FSDP parameter only this
    rank's dim-0 shard (ceil(rows / world) rows, the last shorter, as fully_shard cuts them), else all of it."""
    assert not list(model.buffers()), "a buffer would be left uninitialised: only parameters have sources"
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        source = sources[name]
        if isinstance(param, DTensor):
            local = param.to_local()
            start = param.device_mesh.get_local_rank() * math.ceil(param.shape[0] / param.device_mesh.size())
            if local.shape[0]:
                local.copy_(source[start:start + local.shape[0]])
        else:
            param.copy_(source[:])
    return model


# ------------------------------------------------------------------------------------------------------ signals

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def stop_requests():
    """A list that SIGTERM (Slurm, preemption) or Ctrl-C appends to: the loop finishes its step, writes a training
    state and ends; a second Ctrl-C stops at once. The previous handlers come back afterwards."""
    stop = []

    def on_signal(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
    handlers = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


@contextmanager
def stop_signals_blocked():
    """Processes started in the block (data loader workers) inherit blocked stop signals; worker_init then drops
    them for good. A signal that came meanwhile reaches this process when the block ends."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def worker_init(worker_id):
    """Slurm's SIGTERM and Ctrl-C reach the whole process group: the main process decides when to stop (after the
    step, with a training state), so its loader workers ignore both instead of dying under it."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# ---------------------------------------------------------------------------------------------------------- MFU
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 70, "4090": 165}  # dense bf16


def peak_tflops(device):
    """The known card's dense bf16 peak, else None (no MFU column)."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_step(model, stage):
    """(tokens, images, seq_len) -> FLOPs of a training step, for MFU: trained weights 6N per token, frozen LLM weights
    the gradient flows through 4N, the tower 2N per patch; attention 12 * layers * width * seq_len per token (PaLM).
    `images` counts the tower's inputs, pixel_values rows: with anyres each image's overview and tiles."""
    llm, vision, patches = model.config.llm, model.config.vision, model.config.tile_tokens
    weights = [*model.llm.layers.parameters(), *model.llm.norm.parameters(), model.llm.lm_head.weight]  # no embed
    per_token = sum((6 if stage == 2 and p.requires_grad else 4) * p.numel() for p in weights)
    attention = 12 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim
    per_image = (6 * sum(p.numel() for p in model.projector.parameters()) * patches
                 + 2 * sum(p.numel() for p in model.vision_tower.parameters()) * (patches + 1)
                 + 4 * vision.num_hidden_layers * vision.hidden_size * (patches + 1) ** 2)
    return lambda tokens, images, seq_len: (per_token + attention * seq_len) * tokens + per_image * images
