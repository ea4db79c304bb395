"""Fine-tuning exports: LoRA adapters (lora.py) and elastic weight consolidation (ewc.py)."""
