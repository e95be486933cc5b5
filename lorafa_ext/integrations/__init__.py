"""Interoperability with other libraries: ``lorafa_ext.integrations.peft`` (PEFT's LoRA adapters:
save_adapter, load_adapter, from_peft) and ``lorafa_ext.integrations.transformers`` (Trainer
checkpoints of adapted models). Importing this package imports none of those libraries."""
