"""Tiny random-init transformers models, built offline from configs (no download): the
architectures lowbit's block-wise calibration has to recognise.

Every model: hidden 64, 2 layers, 4 heads (2 key/value heads where the family has
grouped-query attention), intermediate 128, vocab 256, 128 positions, float32, eval mode.
"""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The families of tiny_model(); ENCODER_FAMILIES are further BERT-like encoders.
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt", "bert")
ENCODER_FAMILIES = ("roberta", "xlm-roberta", "distilbert")

VOCAB = 256
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, POSITIONS = 64, 2, 4, 2, 128, 128


def _build(family: str, base: bool):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=POSITIONS)
    decoder = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, **common)
    bert = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, **common)
    if family == "llama":
        cfg = tf.LlamaConfig(**decoder)
        return (tf.LlamaModel if base else tf.LlamaForCausalLM)(cfg)
    if family == "qwen2":
        cfg = tf.Qwen2Config(**decoder)
        return (tf.Qwen2Model if base else tf.Qwen2ForCausalLM)(cfg)
    if family == "mistral":
        cfg = tf.MistralConfig(**decoder, sliding_window=None)
        return (tf.MistralModel if base else tf.MistralForCausalLM)(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
                            n_head=HEADS, n_inner=INTERMEDIATE, bos_token_id=VOCAB - 1,
                            eos_token_id=VOCAB - 1)
        return (tf.GPT2Model if base else tf.GPT2LMHeadModel)(cfg)
    if family == "opt":
        cfg = tf.OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, **common)
        return (tf.OPTModel if base else tf.OPTForCausalLM)(cfg)
    if family == "bert":
        cfg = tf.BertConfig(**bert)
        return (tf.BertModel if base else tf.BertForMaskedLM)(cfg)
    if family == "roberta":
        cfg = tf.RobertaConfig(**bert, pad_token_id=1)
        return (tf.RobertaModel if base else tf.RobertaForMaskedLM)(cfg)
    if family == "xlm-roberta":
        cfg = tf.XLMRobertaConfig(**bert, pad_token_id=1)
        return (tf.XLMRobertaModel if base else tf.XLMRobertaForMaskedLM)(cfg)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, dim=HIDDEN,
                                  n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE)
        return (tf.DistilBertModel if base else tf.DistilBertForMaskedLM)(cfg)
    raise ValueError(f"tiny_model: unknown family {family!r}; choose one of {FAMILIES + ENCODER_FAMILIES}")


def tiny_model(family: str, seed: int = 0, *, base: bool = False) -> tuple[torch.nn.Module, int]:
    """``(model, vocab_size)``: a small random-init model of ``family`` (``FAMILIES`` or
    ``ENCODER_FAMILIES``), float32, eval mode, weights a function of ``seed`` only.

    ``base=False`` gives the model with its head (``LlamaForCausalLM``, ``GPT2LMHeadModel``,
    ``OPTForCausalLM``, ``BertForMaskedLM``...), ``base=True`` the bare base model
    (``LlamaModel``, ``GPT2Model``, ``OPTModel``, ``BertModel``...). The global torch RNG
    is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(family, base)
    return model.float().eval(), VOCAB
