"""Interoperability with other libraries: ``lorafa_ext.integrations.peft`` (PEFT's LoRA adapters:
save_adapter, load_adapter, from_peft). Importing this package imports none of them."""
