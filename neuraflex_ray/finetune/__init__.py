"""Fine-tuning exports: LoRA adapters (lora.py), elastic weight consolidation (ewc.py), the hooks a
family's Train task takes them in with (hooks.py), a fine-tune's set-up (setup.py) and its run (run.py)."""
