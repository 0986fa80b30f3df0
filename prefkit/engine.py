"""The engine a training stage runs on: an accelerate Accelerator for one device, DDP, FSDP2 or
DeepSpeed ZeRO, and the frozen reference placed for it (sharded too, so that it costs each GPU only
its shard)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from prefkit.errors import UserError


def make_accelerator(hardware: DictConfig, model_cfg: DictConfig | None = None, train: DictConfig | None = None):
    """An Accelerator for the hardware config. DDP needs nothing but the launcher (accelerate
    launch / torchrun); FSDP and DeepSpeed ZeRO get their plugin from hardware.fsdp /
    hardware.deepspeed (the block to wrap from the model config)."""
    from accelerate import Accelerator

    precision = {"fp32": "no", "float32": "no", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                 "float16": "fp16"}.get(str(hardware.precision))
    if precision is None:
        raise UserError(f"unknown hardware.precision '{hardware.precision}'; valid: fp32, bf16, fp16")
    if hardware.get("num_threads"):
        torch.set_num_threads(int(hardware.num_threads))
    kwargs: dict[str, Any] = {}
    distributed = str(hardware.get("distributed", "none"))
    if distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        f = hardware.fsdp
        block = model_cfg.get("fsdp_block") if model_cfg is not None else None
        if not block:
            raise UserError("hardware=fsdp needs model.fsdp_block (the transformer block class to wrap)")
        version = int(f.get("version", 2))
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=version, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[str(block)],
            reshard_after_forward=bool(f.reshard_after_forward), cpu_offload=bool(f.cpu_offload),
            activation_checkpointing=bool(f.activation_checkpointing), state_dict_type="FULL_STATE_DICT",
            **({"use_orig_params": True} if version == 1 else {}))
    elif distributed == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        d = hardware.deepspeed
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            zero_stage=int(d.zero_stage), offload_optimizer_device=str(d.offload_optimizer),
            offload_param_device=str(d.offload_param), zero3_init_flag=False, zero3_save_16bit_model=True,
            gradient_clipping=float(train.max_grad_norm) if train is not None and train.get("max_grad_norm") else None)
    elif distributed not in ("none", "ddp"):
        raise UserError(f"unknown hardware.distributed '{distributed}'; valid: none, ddp, fsdp, deepspeed")
    _forget_earlier_settings()
    acc = Accelerator(cpu=str(hardware.device) == "cpu", mixed_precision=precision, **kwargs)
    if distributed in ("fsdp", "deepspeed") and acc.num_processes == 1 and str(hardware.device) == "cpu":
        raise UserError(f"hardware.distributed={distributed} needs GPUs and a launcher "
                        "(accelerate launch --num_processes N -m prefkit.cli ...)")
    if distributed in ("fsdp", "deepspeed") and not is_sharded(acc):  # accelerate drops both on CPU processes
        raise UserError(f"hardware.distributed={distributed} did not take effect (accelerate runs this as "
                        f"{acc.distributed_type.value}): it needs GPUs and several processes under a launcher "
                        "(on CPU processes use hardware.distributed=ddp)")
    return acc


def _forget_earlier_settings() -> None:
    """accelerate keeps one AcceleratorState per process and refuses another precision or engine in
    it; jobs run one after another in one process (prefkit.api, a multirun sweep) may differ in
    both. The process group (PartialState) is kept: under a launcher it is the same for every job."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)


def is_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: parameters exist whole only inside a module's forward."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def prepare_reference(accelerator, module: nn.Module, hardware: DictConfig, model_cfg: DictConfig) -> nn.Module:
    """Place the frozen reference for the engine in use: as is (one device, DDP: no gradients, so
    nothing to synchronise), sharded block by block with FSDP2's fully_shard (hardware=fsdp), or in
    a DeepSpeed ZeRO-3 inference engine (hardware=deepspeed_zero3), so that it costs each GPU
    only its shard. Its forward then gathers the weights (prefkit.modules.ShardableReference)."""
    from accelerate.utils import DistributedType

    module.eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import fully_shard

        block = str(model_cfg.fsdp_block)
        module.to(accelerator.device)
        for sub in module.modules():
            if type(sub).__name__ == block:
                fully_shard(sub)
        return fully_shard(module)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        config = {"train_micro_batch_size_per_gpu": ds.get("train_micro_batch_size_per_gpu", 1),
                  "zero_optimization": {"stage": 3 if ds["zero_optimization"]["stage"] == 3 else 0},
                  "bf16": {"enabled": str(hardware.precision) in ("bf16", "bfloat16")},
                  "fp16": {"enabled": str(hardware.precision) in ("fp16", "float16")}}
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()
        return engine
    return module.to(accelerator.device)
