"""The finetuning recipe, top to bottom: parse → pre-flight → data → model → trainer → save.

    python -m engine.train --model_id ./my-model --train_data data.jsonl --use_qlora true
    accelerate launch --multi_gpu --num_processes 2 -m engine.train --use_ddp true ...

`python -m engine.train --help` lists every flag. Rank 0 writes progress to events.jsonl
(engine/events.py); a problem found before training exits with code 2, a crash with code 1,
each after a `failed` event that says what happened and what to do.
"""

import dataclasses
import errno
import functools
import gc
import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import PeftType, TrainConfig, parse_args
from engine.events import EventWriter

if TYPE_CHECKING:
    from engine.memory import ModelShape

log = logging.getLogger("engine.train")

EXIT_PREFLIGHT = 2
# What a rank sees when another rank dies mid-collective (gloo on CPU, NCCL on GPUs).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
             "NCCL communicator was aborted")
# A full disk, as Python and safetensors report it, and as torch.save's zip writer does (it drops
# the errno: "unexpected pos 576 vs 534" on a full tmpfs, torch 2.13).
DISK_FULL = ("No space left on device", "Disk quota exceeded", "file write failed", "unexpected pos")


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


class Recipe:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.events = EventWriter(
            config.events_file or self.output_dir / "events.jsonl", enabled=_rank() == 0
        )

    def setup(self) -> None:
        # Imports that pull in torch and transformers wait until the pre-flight has passed, so a
        # typo in a flag is reported in a second, not after a multi-second import.
        import torch
        from transformers import set_seed

        from engine import data, faults, memory, model
        from engine.trainer_args import deepspeed_keeps_adapter_fp32

        config = self.config
        memory.configure_allocator()
        set_seed(config.seed)  # the adapter's initial weights come from the global RNG
        if config.cleanup_output_dir_on_start and _rank() == 0:
            shutil.rmtree(self.output_dir, ignore_errors=True)
        memory.apply_memory_limit(int(os.environ.get("LOCAL_RANK", 0)))

        self.tokenizer = model.load_tokenizer(config)
        template_source = data.setup_chat_template(self.tokenizer, config.chat_template)
        log.info("chat template: %s", template_source)

        # Data before the model: tokenizing is cheap next to loading weights, and fails faster.
        self.datasets = data.build_datasets(config, self.tokenizer)
        log.info(
            "data: %d train / %d eval examples, %d train tokens, %d truncated at max_length %d",
            self.datasets.num_train_examples, self.datasets.num_eval_examples,
            self.datasets.train_tokens, self.datasets.num_truncated, config.max_length,
        )
        attention, why = model.pick_attention(config)
        log.info("attention: %s (%s)", attention, why)
        self.model = model.load_model(config, attention)
        if config.offload_embeddings:
            self._offload_embeddings()
        chunked_loss = self._chunked_loss()
        self.compiled = self._compiled()
        if config.offload_activations and not config.gradient_checkpointing:
            # A preset's offload stands aside when a person turns checkpointing off, instead of failing.
            log.info("offload_activations: off, gradient_checkpointing is false: there are no checkpoints to offload")
        self.targets = config.lora_target_modules or model.resolve_target_modules(self.model)
        if config.peft_type != PeftType.none:
            log.info("adapter %s on %s", config.peft_type.value, ", ".join(self.targets))
        self.model = model.add_adapter(self.model, config, self.targets)
        faults.watch(self.model)  # nothing unless a test plans an out-of-memory above some pass size
        memory.release_cached()  # loading and quantizing leave GBs cached that training may not reuse
        if config.bf16 and deepspeed_keeps_adapter_fp32(config):
            # DDP's numerics under DeepSpeed (trainer_args says why DeepSpeed itself stays fp32).
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model.forward = torch.autocast(device, dtype=torch.bfloat16)(self.model.forward)
        if config.packing:
            self.config = config = self._grow_passes(config)
        self.auto_batch = self._find_batch() if config.auto_find_batch_size else None
        if config.offload_activations and config.gradient_checkpointing and torch.cuda.is_available():
            self._check_host_memory()
        self.resolved = {
            **self.config.to_dict(),
            "lora_target_modules": self.targets,
            "attention": attention,
            "chat_template_source": template_source,
            "chunked_loss": chunked_loss,
            "torch_compile": self.compiled,
        }
        self.trainer = self._build_trainer()

    @functools.cached_property
    def shape(self) -> "ModelShape":
        """The loaded model's shape, as the memory estimate reads it."""
        from engine.memory import ModelShape

        return ModelShape.from_config(self.model.config.to_dict())

    def _offload_embeddings(self) -> None:
        from engine.embeddings import offload_embeddings, why_not_offloaded
        from engine.zero import zero_stage

        why_not = why_not_offloaded(self.config, self.shape.tied_embeddings, zero_stage(self.config.deepspeed))
        if why_not:
            log.info("offload_embeddings: off, %s", why_not)
        else:
            log.info("offload_embeddings: the input embedding table (%.2f GiB) looked up in CPU memory",
                     offload_embeddings(self.model))

    def _check_host_memory(self) -> None:
        """Offloaded checkpoints beyond the CPU memory free: a readable error now, instead of the
        kernel killing the process mid-step (7B at 196,608 tokens wants 96 GiB; benchmarks/RESULTS.md)."""
        import psutil

        from engine.memory import HostMemoryError, largest_pass_tokens, offloaded_gib

        needed = offloaded_gib(self.shape, self.config) * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        free = psutil.virtual_memory().available / 2**30
        log.info("offload_activations: up to %.1f GiB of CPU memory on this machine, %.1f GiB free", needed, free)
        if needed > free:
            raise HostMemoryError(
                f"offload_activations needs about {needed:.1f} GiB of CPU memory for passes of "
                f"{largest_pass_tokens(self.config):,} tokens, and this machine has {free:.1f} GiB free.",
                "Lower max_length (or pack_tokens), or turn offload_activations off to keep those activations "
                "on the GPU.",
            )

    def _grow_passes(self, config: TrainConfig) -> TrainConfig:
        """pack_tokens 0 on a GPU: passes as large as the memory estimate lets them grow (engine/memory.py)."""
        import torch

        from engine.config import token_budget
        from engine.memory import grown_pack_tokens, memory_limit
        from engine.zero import zero_stage

        examples = config.per_device_train_batch_size * config.gradient_accumulation_steps
        if not config.pack_tokens and torch.cuda.is_available():
            limit, source = memory_limit(torch.device("cuda", torch.cuda.current_device()))
            grown = grown_pack_tokens(self.shape, config, limit / 2**30, zero_stage=zero_stage(config.deepspeed),
                                      num_gpus=int(os.environ.get("WORLD_SIZE", 1)))
            log.info("packing: passes of up to %d tokens, as many as the memory estimate fits in %.1f GiB (%s)",
                     grown, limit / 2**30, source)
            config = dataclasses.replace(config, pack_tokens=grown)
        log.info("packing: each step's %d examples per process in passes of up to %d tokens",
                 examples, token_budget(config))
        return config

    def _find_batch(self) -> dict:
        """Measures the largest pass that fits (engine/batch_finder.py) and trains with it."""
        from engine.batch_finder import find_batch
        from engine.trainer_args import training_arguments

        # The run's own arguments: they start the processes' group the ranks agree through, and say
        # how the Trainer will run the model.
        args = training_arguments(self.config, self.datasets)
        found = find_batch(self.model, self.config, args, self._model_callbacks())
        log.info(found.why)
        self.config = found.config
        return found.event

    def _model_callbacks(self) -> list:
        """The callbacks that change the model as training begins; the batch finder's probe runs them too."""
        callbacks = []
        if self.config.tiled_mlp:
            from engine.tiled_mlp import TileMLPs

            callbacks.append(TileMLPs(self.config.tiled_mlp_tokens))
        if self.config.offload_activations and self.config.gradient_checkpointing:
            from engine.offload import OffloadCheckpoints

            callbacks.append(OffloadCheckpoints())
        if self.compiled:  # last: it traces whichever forward the callbacks above leave
            from engine.compile import CompileLayers

            callbacks.append(CompileLayers(self.config.activation_memory_budget))
        return callbacks

    def _chunked_loss(self) -> bool:
        """Installs the chunked loss on the model (before PEFT wraps it); whether it runs."""
        from engine import loss
        from engine.trainer_args import uses_liger

        if not self.config.chunked_loss:
            return False
        if uses_liger(self.config):
            why_not = "Liger's fused linear cross-entropy does the same on this GPU"
        else:
            why_not = loss.install(self.model)
        log.info("chunked_loss: %s", f"off, {why_not}" if why_not else "on")
        return why_not is None

    def _compiled(self) -> bool:
        """Whether torch_compile runs (engine/compile.py), logged with the reason when it cannot."""
        from engine.compile import why_not_compiled

        if not self.config.torch_compile:
            return False
        why_not = why_not_compiled(self.config)
        log.info("torch_compile: %s", f"off, {why_not}" if why_not else "each decoder layer")
        return why_not is None

    def _build_trainer(self):
        from transformers import DataCollatorForSeq2Seq

        from engine import faults
        from engine.callbacks import EventsCallback, StopOnSignal
        from engine.checkpoints import AtomicCheckpointTrainer
        from engine.config import token_budget
        from engine.packing import StepCollator, StepPackingTrainer
        from engine.trainer_args import optimizer_cls_and_kwargs, training_arguments

        config = self.config
        args = training_arguments(config, self.datasets)
        if args.deepspeed:
            self.resolved["deepspeed_config"] = args.deepspeed
            log.info("deepspeed: %s", json.dumps(args.deepspeed.get("zero_optimization")))
        self.stop = StopOnSignal()
        callbacks = [
            EventsCallback(
                self.events,
                {
                    "num_train_examples": self.datasets.num_train_examples,
                    "num_eval_examples": self.datasets.num_eval_examples,
                    "train_tokens": self.datasets.train_tokens,
                    "num_truncated": self.datasets.num_truncated,
                    "config": self.resolved,
                    **({"auto_batch": self.auto_batch} if self.auto_batch else {}),
                },
            ),
            self.stop,
            *faults.callbacks(),  # none unless a test plans a fault
            *self._model_callbacks(),
        ]
        if config.mlfoundry_enable_reporting:
            from engine.tracking import TrueFoundryCallback

            callbacks.append(TrueFoundryCallback(config))
        if config.packing:
            trainer_class, collator = StepPackingTrainer, StepCollator(token_budget(config))
        else:  # the seed's way: pad each micro-batch to its longest example, labels with -100
            trainer_class = AtomicCheckpointTrainer
            collator = DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)
        return trainer_class(
            model=self.model,
            args=args,
            train_dataset=self.datasets.train,
            eval_dataset=self.datasets.eval,
            data_collator=collator,
            processing_class=self.tokenizer,
            callbacks=callbacks,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(config, args),
        )

    def train(self) -> None:
        resume = self.config.resume_from_checkpoint
        if resume:
            _restore_cpu_index_locations()
        result = self.trainer.train(resume_from_checkpoint=True if resume == "true" else resume)
        self.train_metrics = result.metrics

    def save(self) -> None:
        from engine import model
        from engine.checkpoints import publish_files, publish_folder, staged

        # Written aside, then moved into place: a save cut short leaves no half adapter (engine/checkpoints.py).
        with staged(self.output_dir, "final") as staging:
            self.trainer.save_model(str(staging))  # adapter (or full model) + tokenizer
            self.trainer.accelerator.wait_for_everyone()
            if self.trainer.is_world_process_zero():
                (staging / "finetune_config.json").write_text(json.dumps(self.resolved, indent=2))
                publish_files(staging, self.output_dir)
        state = self.trainer.state
        if self.stop.stopped:
            self.events.write(
                "stopped", step=state.global_step,
                checkpoint=str(self.output_dir / f"checkpoint-{state.global_step}"),
                adapter_path=str(self.output_dir),
            )
            return
        merged_path = None
        if self.config.merge_adapter and self.config.peft_type != PeftType.none:
            self.trainer.accelerator.wait_for_everyone()
            if self.trainer.is_world_process_zero():
                del self.trainer.model, self.model  # free the training copy before loading a 16-bit base
                with staged(self.output_dir, "merged") as staging:
                    model.merge_adapter(self.config, self.output_dir, staging)
                    publish_folder(staging, self.output_dir / "merged")
                merged_path = str(self.output_dir / "merged")
        self.events.write(
            "finished",
            adapter_path=str(self.output_dir),
            merged_path=merged_path,
            step=state.global_step,
            train_runtime_s=self.train_metrics.get("train_runtime"),
            train_loss=self.train_metrics.get("train_loss"),
        )


@functools.cache  # once a process: torch sorts its registry, and two entries of one priority do not sort
def _restore_cpu_index_locations() -> None:
    """Lets torch.load restore to "cpu:0": on resume, HF maps the optimizer state to args.device,
    which multi-process CPU training reports as "cpu:0", a location torch only knows as "cpu"
    (transformers 5.17, torch 2.13)."""
    import torch

    torch.serialization.register_package(
        5, lambda obj: None, lambda obj, location: obj if location.startswith("cpu:") else None
    )


def _configure_logging() -> None:
    logging.basicConfig(
        format=f"%(asctime)s [rank {_rank()}] %(levelname)s %(name)s: %(message)s",
        level=logging.INFO,
        stream=sys.stdout,
    )


def _explain(exc: BaseException, config: TrainConfig) -> tuple[str, str]:
    from engine import memory

    if isinstance(exc, memory.HostMemoryError):
        return exc.args[0], exc.args[1]
    if memory.is_out_of_memory(exc):
        return "The GPU ran out of memory.", memory.out_of_memory_hint(config)
    if _is_disk_full(exc):
        kept = config.save_total_limit or "0, which keeps all"
        return (
            "The disk ran out of space while the run was writing to it.",
            f"Free space on the disk holding {config.output_dir}, or keep fewer checkpoints (save_total_limit, "
            f"now {kept}); then resume the run: it continues from its last complete checkpoint.",
        )
    if any(sign in str(exc) for sign in PEER_GONE):
        return (
            "Another process of this run stopped unexpectedly, so this one could not go on.",
            "The log names the process that failed first and why (out of memory and killed processes "
            "are the usual causes).",
        )
    if isinstance(exc, OSError) and "model_id" not in str(exc) and config.model_id in str(exc):
        return (
            f"Could not load the model {config.model_id}.",
            "Check model_id: a hub id you can access, or a local model folder.",
        )
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return (
        f"{type(exc).__name__}: {first_line}",
        "Read the log for the full error; fix the cause and start the run again.",
    )


def _is_disk_full(exc: BaseException | None) -> bool:
    while exc is not None:  # savers wrap the OSError in errors of their own
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(s in str(exc) for s in DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    config = parse_args(argv)
    recipe = Recipe(config)

    from engine.preflight import preflight

    problems = preflight(config)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        recipe.events.write(
            "failed",
            error=f"The configuration has {len(problems)} problem(s): " + problems[0],
            hint="Fix each of these and start again: " + " | ".join(problems),
            problems=problems,
        )
        return EXIT_PREFLIGHT
    try:
        recipe.setup()
        recipe.train()
        recipe.save()
    except BaseException as exc:  # noqa: BLE001 - every crash becomes a readable `failed` event
        error, hint = _explain(exc, recipe.config)  # the config training ran with
        log.error("%s %s", error, hint)
        recipe.events.write(
            "failed", error=error, hint=hint, traceback_tail="".join(traceback.format_exc()[-4000:])
        )
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise
    return 0


if __name__ == "__main__":
    code = main()
    # Exempts the heap from the collection at interpreter exit, which took ~8 s of CPU per process
    # walking the objects of every module transformers imports; the OS frees them instead.
    gc.freeze()
    sys.exit(code)
