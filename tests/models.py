"""Tiny transformers models for the layer and PEFT tests, built from a config (random init,
nothing from a hub)."""
from __future__ import annotations

import torch

VOCAB = 64


def tiny_llama(seed=0):
    """A 2-layer LlamaForCausalLM, hidden size 32."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert_classifier(seed=0, num_labels=3):
    """A 2-layer BertForSequenceClassification, hidden size 32, with a fresh classifier head."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    """A 2-layer GPT2LMHeadModel (its projections are transformers Conv1D modules)."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_ids(batch=2, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
