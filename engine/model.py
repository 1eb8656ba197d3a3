"""Base model loading (dtype, attention backend, 4-bit) and adapters (LoRA, QLoRA, DoRA, IA3)."""

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import import_utils

from engine.config import PeftType, TrainConfig
from engine.zero import zero_stage

log = logging.getLogger(__name__)


def compute_dtype(config: TrainConfig) -> torch.dtype:
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float32


def pick_attention(config: TrainConfig) -> tuple[str, str]:
    """The attention backend to use and why, best first: flash-attn 2, flash-attn 4, PyTorch's
    varlen flash kernel (packed micro-batches), SDPA."""
    from engine.attention import VARLEN, varlen_available  # registers the varlen backend

    if not torch.cuda.is_available():
        return "sdpa", "flash attention needs a CUDA GPU; this machine has none"
    if not (config.bf16 or config.fp16):
        return "sdpa", "flash attention needs bf16 or fp16; neither is on"
    if config.use_flash_attention and import_utils.is_flash_attn_2_available():
        return "flash_attention_2", "flash-attn 2 is installed"
    if config.use_flash_attention and import_utils.is_flash_attn_4_available():
        return "flash_attention_4", "flash-attn 4 is installed (flash-attn 2 is not)"
    if config.packing and varlen_available():
        return VARLEN, "packed passes: PyTorch's varlen flash kernel, no FLOPs between examples"
    if not config.use_flash_attention:
        return "sdpa", "use_flash_attention and packing are false"
    return "sdpa", "neither flash-attn 2 nor 4 is installed; PyTorch SDPA picks its own flash kernel"


def load_tokenizer(config: TrainConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(config.model_id)
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss, so any existing token serves; unk keeps eos unambiguous.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _device_map(config: TrainConfig) -> dict | None:
    # A quantized model must be placed at load time; each rank takes its own GPU. DeepSpeed and
    # DDP place a 16-bit model themselves. Under ZeRO-3 too: transformers (5.17) loads a quantized
    # model whole, without zero.Init, and DeepSpeed splits it when training starts; with no
    # device_map bitsandbytes would pick torch.cuda.current_device(), GPU 0 on every rank this early.
    if not config.use_qlora:
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def _quant_storage(config: TrainConfig) -> dict:
    # ZeRO-3 shards every weight as a flat tensor of the model's dtype and gathers it back per layer.
    # Packed into the compute dtype (4 values a bf16 element), a 4-bit weight is sharded like any
    # other; bitsandbytes reads the bytes whatever dtype holds them.
    if zero_stage(config.deepspeed) == 3:
        return {"bnb_4bit_quant_storage": compute_dtype(config)}
    return {}


def _keep_4bit_layout(model: PreTrainedModel) -> None:
    """Stops bitsandbytes (0.50) repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    Linear4bit.forward does it in place at the first forward in eval mode, and changes the
    quant_state kept on the parameter. Training after an evaluation then runs through that
    inference kernel, which has no backward: the gradient stops there without an error (on the
    tiny model, the fourth step's loss 5.66 instead of 5.90 when an evaluation came between). Under
    ZeRO-3 the repacked tensor is a gathered copy that is dropped after the layer runs: later passes
    read the original layout with the repacked quant_state (wrong outputs), and saving fails an
    assert in _convert_weight_packed_for_cpu_inverse.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(config: TrainConfig, attention: str) -> PreTrainedModel:
    kwargs = {"dtype": compute_dtype(config), "attn_implementation": attention}
    storage = _quant_storage(config)
    if config.use_qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(config),
            **storage,
        )
    model = AutoModelForCausalLM.from_pretrained(config.model_id, device_map=_device_map(config), **kwargs)
    if config.use_qlora and not torch.cuda.is_available():
        _keep_4bit_layout(model)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def resolve_target_modules(model: PreTrainedModel) -> list[str]:
    """`auto`: every linear layer but the output head, by its short name (q_proj, ..., down_proj).

    Works for any architecture and for 4-bit layers, whose classes subclass nn.Linear.
    """
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def _feedforward_modules(model: PreTrainedModel, targets: list[str]) -> list[str]:
    """IA3 scales the input of feed-forward down projections: the targets fed the MLP's hidden size."""
    inner = getattr(model.config, "intermediate_size", None)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and name.rsplit(".", 1)[-1] in targets
            and module.in_features == inner
        }
    )


def _store_embeddings_in(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Undoes prepare_model_for_kbit_training's fp32 copy of the input embedding and output head,
    keeping what it is for: the embedding's output is cast to fp32 on the fly (the same values, so
    norms and the residual stream still run in fp32), and the head's matmul runs under autocast in
    `dtype` whatever its weight is stored in. The same numbers for 2 bytes less per embedding
    parameter: 0.5 GiB for a 7B model, the largest 16-bit tensors it has.
    """
    if dtype == torch.float32:
        return
    model.get_input_embeddings().to(dtype).register_forward_hook(lambda module, args, output: output.float())
    model.get_output_embeddings().to(dtype)


def add_adapter(model: PreTrainedModel, config: TrainConfig, targets: list[str]) -> PreTrainedModel:
    """Wraps the model in a PEFT adapter, or leaves it whole for full finetuning."""
    if config.peft_type == PeftType.none:
        return model
    from peft import IA3Config, LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.use_qlora and config.upcast_layernorm:
        # The seed's way. Without it nothing else is needed: get_peft_model freezes the base, and
        # non-reentrant checkpointing (trainer_args) needs no input gradients.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
        _store_embeddings_in(model, compute_dtype(config))
    if config.peft_type == PeftType.ia3:
        adapter = IA3Config(
            task_type="CAUSAL_LM",
            target_modules=targets,
            feedforward_modules=_feedforward_modules(model, targets),
        )
    else:
        adapter = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            use_dora=config.use_dora,
        )
    return get_peft_model(model, adapter)


def merge_adapter(config: TrainConfig, adapter_dir: Path, merged_dir: Path) -> Path:
    """Writes base + adapter as one model. A QLoRA base is reloaded in 16-bit, never merged in 4-bit."""
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Rank 0 merges alone, after training. With a ZeRO-3 config still registered, transformers would
    # load the base through zero.Init, sharded across ranks that have finished: it fails waiting for them.
    unset_hf_deepspeed_config()
    dtype = compute_dtype(config) if config.bf16 or config.fp16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)
    return merged_dir
