"""Fine-tuning: masked next-token loss, optax AdamW, LoRA, Orbax train state (see each module)."""

from .data import Example, load_examples, tokenize_record
from .lora import LoRAConfig, merge_adapters
from .step import TrainConfig, loss_fn, masked_cross_entropy
from .trainer import Trainer, finetune

__all__ = ["Example", "LoRAConfig", "TrainConfig", "Trainer", "finetune", "load_examples", "loss_fn",
           "masked_cross_entropy", "merge_adapters", "tokenize_record"]
