"""Launchers (accelerate's distributed types) under which a Trap² step would be silently wrong: refused when the
trainer is built, so a script calling `Trap2Trainer` directly gets the same refusal as the recipes."""

from .updates import update_kind


def refuse_unsupported_launcher(trainer) -> None:
    """Raise NotImplementedError, naming the fix, for full fine-tuning under FSDP / DeepSpeed ZeRO-3 and for
    DeepSpeed with a trainer that would step its optimizer at every backward (see docs/distributed.md)."""
    from accelerate.utils import DistributedType

    args, accelerator = trainer.args, trainer.accelerator
    kind = accelerator.distributed_type
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if kind == DistributedType.DEEPSPEED else None
    # theta0 is a snapshot of whole parameters, and re-scaling writes whole parameters.
    if update_kind(args).needs_reference and (kind == DistributedType.FSDP or zero_stage == 3):
        raise NotImplementedError(
            "trap_target='full' with FSDP or DeepSpeed ZeRO-3 is not supported: theta0 is snapshotted before the "
            "parameters are sharded and the re-scaling writes whole parameters. Use DDP or ZeRO-2 for a full "
            "fine-tune, or a LoRA adapter (trap_target='adapter') with FSDP/ZeRO-3."
        )
    if kind == DistributedType.DEEPSPEED and args.trap_lambda > 0 and not getattr(trainer, "trap_supports_deepspeed", False):
        raise NotImplementedError(
            "DeepSpeed steps its optimizer inside every backward at an accumulation boundary (accelerate's "
            "DeepSpeedEngineWrapper.backward), and a Trap² step runs 1 + trap_scales_per_step backwards per "
            "micro-batch, so this trainer would take that many optimizer steps per step. Use DDP or FSDP "
            "(recipes/accelerate_configs/), or trap_lambda=0; see docs/distributed.md."
        )
