"""Parameter-efficient fine-tuning as transforms over a frozen model: LoRA/DoRA, QLoRA, prompt/prefix tuning, freeze rules, PEFT export."""
