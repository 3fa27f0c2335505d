"""Tiny, randomly initialised vision-language backbones written in the real on-disk format.

Tests and benchmarks need a VLM folder without downloading one: these functions build a
transformers model from a config in code, save it with save_pretrained (config.json +
model.safetensors), and save a tokenizer built locally with the `tokenizers` library
(a WordLevel vocabulary) next to it, plus a preprocessor_config.json with the image
normalisation. The folder then loads through the same path as a real SmolVLM or PaliGemma
download (AutoModelForImageTextToText / AutoTokenizer with local_files_only=True).

The sizes are keyword arguments, so a benchmark can write a larger one (e.g. text_hidden=256,
text_layers=8) to time the same code at a more realistic size.
"""

import json
from pathlib import Path

import torch

# A small word vocabulary: enough for the simulator's instructions; anything else is <unk>.
WORDS = ('pick up the red green blue cube block peg socket insert it into and transfer to '
         'other arm place on in box put left right hand grasp move lift a')
SPECIAL = ('<pad>', '<unk>', '<s>', '</s>', '<image>')


def _write_tokenizer(folder: Path) -> int:
    """Save a WordLevel tokenizer into `folder`; return its vocabulary size."""
    from tokenizers import pre_tokenizers, Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + tuple(dict.fromkeys(WORDS.split())))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token='<unk>',
                                   pad_token='<pad>', bos_token='<s>', eos_token='</s>')
    fast.save_pretrained(str(folder))
    return len(vocab)


def _write_preprocessor(folder: Path, image_size: int) -> None:
    # Only the normalisation is read by TransformersVLA; the rest mirrors a real folder.
    (folder / 'preprocessor_config.json').write_text(json.dumps({
        'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5],
        'rescale_factor': 1 / 255, 'size': {'longest_edge': image_size}}, indent=2) + '\n')


def write_tiny_smolvlm(folder: Path, *, vision_hidden: int = 32, vision_layers: int = 1,
                       image_size: int = 32, patch_size: int = 8, scale_factor: int = 2,
                       text_hidden: int = 48, text_layers: int = 3, text_heads: int = 4,
                       text_kv_heads: int = 2, vision_heads: int = 2, seed: int = 0) -> Path:
    """Write a random SmolVLM (SigLIP-style vision tower + Llama text model) folder.

    Each image becomes ((image_size / patch_size) / scale_factor)^2 prefix tokens (4 with
    the defaults).
    """
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(folder)
    config = SmolVLMConfig(
        vision_config={'hidden_size': vision_hidden, 'intermediate_size': 2 * vision_hidden,
                       'num_hidden_layers': vision_layers,
                       'num_attention_heads': vision_heads,
                       'image_size': image_size, 'patch_size': patch_size},
        text_config={'model_type': 'llama', 'hidden_size': text_hidden,
                     'intermediate_size': 2 * text_hidden, 'num_hidden_layers': text_layers,
                     'num_attention_heads': text_heads, 'num_key_value_heads': text_kv_heads,
                     'vocab_size': vocab_size, 'max_position_embeddings': 512,
                     'pad_token_id': 0, 'bos_token_id': 2, 'eos_token_id': 3},
        scale_factor=scale_factor, image_token_id=SPECIAL.index('<image>'))
    torch.manual_seed(seed)
    SmolVLMForConditionalGeneration(config).save_pretrained(str(folder))
    _write_preprocessor(folder, image_size)
    return folder


def write_tiny_paligemma(folder: Path, *, vision_hidden: int = 32, vision_layers: int = 1,
                         image_size: int = 32, patch_size: int = 8, text_hidden: int = 48,
                         text_layers: int = 3, text_heads: int = 4, seed: int = 0) -> Path:
    """Write a random PaliGemma (SigLIP vision tower + Gemma text model) folder.

    Each image becomes (image_size / patch_size)^2 prefix tokens (16 with the defaults).
    """
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(folder)
    config = PaliGemmaConfig(
        vision_config={'model_type': 'siglip_vision_model', 'hidden_size': vision_hidden,
                       'intermediate_size': 2 * vision_hidden,
                       'num_hidden_layers': vision_layers, 'num_attention_heads': 2,
                       'image_size': image_size, 'patch_size': patch_size,
                       'vision_use_head': False},
        text_config={'model_type': 'gemma', 'hidden_size': text_hidden,
                     'intermediate_size': 2 * text_hidden, 'num_hidden_layers': text_layers,
                     'num_attention_heads': text_heads, 'num_key_value_heads': 1,
                     'head_dim': text_hidden // text_heads, 'vocab_size': vocab_size,
                     'pad_token_id': 0, 'bos_token_id': 2, 'eos_token_id': 3},
        image_token_index=SPECIAL.index('<image>'), vocab_size=vocab_size,
        projection_dim=text_hidden, hidden_size=text_hidden)
    torch.manual_seed(seed)
    PaliGemmaForConditionalGeneration(config).save_pretrained(str(folder))
    _write_preprocessor(folder, image_size)
    return folder
