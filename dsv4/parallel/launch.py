"""Starting the ranks of one expert-parallel engine.

One node, one command: `EngineConfig(gpus=N)` (CLI `--gpus N`). The calling process becomes rank 0 (the
front end: request placement, the HTTP server or the offline loop, and GPU 0's share of the work) and
starts ranks 1..N-1 as child processes; they meet through a free local TCP port.

Several nodes: start every rank with torchrun (its rendezvous sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT); rank 0 is the front end, the others serve steps until it stops:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        -m dsv4.cli serve /ckpt/DeepSeek-V4-Flash --host 0.0.0.0

Each rank builds its engine with its share of the routed experts (ExpertMap.contiguous), reading only
those tensors from the shards. Tensors move over NCCL (gloo on the CPU); the per-step control messages
(new requests, aborts, outputs, the step agreement) over a gloo group.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv4.config import ConfigError, EngineConfig
from dsv4.engine.client import EngineClient
from dsv4.engine.llm_engine import LLMEngine
from dsv4.parallel.dp_engine import DPEngine, worker_loop
from dsv4.parallel.ep import ExpertParallel
from dsv4.parallel.step_sync import StepSync
from dsv4.parallel.teardown import hard_exit_if_needed, teardown
from dsv4.platforms import detect

log = logging.getLogger("dsv4.parallel")
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # ranks wait for rank 0's next step for as long as it is idle


@dataclass(frozen=True)
class DistSpec:
    rank: int
    world: int
    local_rank: int
    init_method: str  # "env://" (torchrun) or "tcp://127.0.0.1:PORT" (one node, --gpus)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistSpec | None":
        """The rank torchrun started (None outside torchrun, or for a world of one)."""
        env = os.environ if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ConfigError(f"torchrun environment: RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                              f"LOCAL_RANK={env.get('LOCAL_RANK')!r} are not integers") from None
        return None if world == 1 else cls(rank, world, local, "env://")


@dataclass
class RankContext:
    """What one rank's engine needs to step with the others."""

    spec: DistSpec
    ctrl: object  # gloo process group for host messages
    ep: ExpertParallel
    sync: StepSync  # the engine's StepCoordinator


def rank_config(config: EngineConfig, spec: DistSpec) -> EngineConfig:
    """This rank's engine config: its own device (GPU `local_rank`; the CPU is shared) and one GPU."""
    platform = detect(config.device)
    return dataclasses.replace(config, device=platform.rank_device(spec.local_rank), gpus=1)


def init_rank(config: EngineConfig, spec: DistSpec) -> RankContext:
    platform = detect(config.device)
    kw = {}
    if platform.is_gpu:
        torch.cuda.set_device(platform.torch_device)
        kw["device_id"] = platform.torch_device
    if not dist.is_initialized():
        dist.init_process_group(platform.dist_backend, init_method=spec.init_method, rank=spec.rank,
                                world_size=spec.world, **kw)
    ctrl = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _same_config(config, spec, ctrl)
    ep = ExpertParallel(exchange=config.ep_exchange)
    return RankContext(spec, ctrl, ep, StepSync(ctrl, ep))


def _same_config(config: EngineConfig, spec: DistSpec, ctrl) -> None:
    """Every rank must run the same engine config (but its own device): lockstep depends on it."""
    mine = dataclasses.replace(config, device=None)
    every = [None] * spec.world
    dist.all_gather_object(every, mine, group=ctrl)
    for r, other in enumerate(every):
        if other != mine:
            diff = [f"{f.name}: {getattr(mine, f.name)!r} here, {getattr(other, f.name)!r} on rank {r}"
                    for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(other, f.name)]
            raise ConfigError(f"rank {spec.rank}: the ranks were started with different engine configs "
                              f"({'; '.join(diff)})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_main(config: EngineConfig, spec: DistSpec) -> None:
    """Ranks 1..N-1 started by `start_engine`."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {spec.rank} %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; rank 0 handles it and stops this rank (or, if rank 0 dies, the
    # control group breaks and this rank leaves). A KeyboardInterrupt here would only break the clean stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_worker(config, spec)
    hard_exit_if_needed(0)


def run_worker(config: EngineConfig, spec: DistSpec) -> None:
    """A rank other than 0: build its engine and serve steps until rank 0 stops."""
    cfg = rank_config(config, spec)
    ctx = init_rank(cfg, spec)
    try:
        worker_loop(LLMEngine(cfg, coordinator=ctx.sync), ctx)
    finally:
        teardown()


def start_engine(config: EngineConfig, spec: DistSpec | None = None) -> EngineClient:
    """The one place that decides one rank or many: the engine this process drives is a plain LLMEngine for
    one device; for several ranks, rank 0's DPEngine (starting ranks 1..N-1 here when `config.gpus` > 1).
    Under torchrun, call only on rank 0 (the CLI runs `run_worker` on the others). The public dsv4.LLM and
    dsv4.AsyncLLM start their engine here (dsv4/entry.py)."""
    config.validate()
    if spec is not None and config.gpus > 1:
        raise ConfigError(f"gpus={config.gpus} starts ranks on this node; under torchrun (world size {spec.world}) "
                          "the ranks are torchrun's: leave gpus at 1")
    if spec is None and config.gpus == 1:
        return LLMEngine(config)
    children = []
    if spec is None:
        platform = detect(config.device)
        if platform.is_gpu and config.gpus > torch.cuda.device_count():
            raise ConfigError(f"gpus={config.gpus}, but this node has {torch.cuda.device_count()} GPU(s)")
        if platform.is_gpu and platform.torch_device.index not in (None, 0):
            raise ConfigError(f"gpus={config.gpus} uses GPUs 0..{config.gpus - 1}; give --device cuda, not "
                              f"{config.device!r} (CUDA_VISIBLE_DEVICES picks which GPUs)")
        init = f"tcp://127.0.0.1:{_free_port()}"
        spec = DistSpec(0, config.gpus, 0, init)
        mpc = mp.get_context("spawn")
        for r in range(1, config.gpus):
            p = mpc.Process(target=_child_main, args=(config, DistSpec(r, config.gpus, r, init)),
                            name=f"dsv4-rank{r}", daemon=True)
            p.start()
            children.append(p)
    if spec.rank != 0:
        raise ConfigError(f"start_engine runs on rank 0; rank {spec.rank} serves steps (run_worker)")
    cfg = rank_config(config, spec)
    try:
        ctx = init_rank(cfg, spec)
        return DPEngine(LLMEngine(cfg, coordinator=ctx.sync), ctx, children)
    except BaseException:
        for p in children:
            p.terminate()
        raise
