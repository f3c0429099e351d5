"""A tiny random-init BLIP-2 (OPT) saved like a hub snapshot, for tests, CI and the demo.

No weights can be downloaded here, yet the captioning stage must run its real
code path (hub-style directory -> `from_pretrained` -> processor -> batched
generation) on every machine. This builds the same architecture at toy size
(a few hundred kilobytes) with a word-level tokenizer trained on the spot, and
saves model + `Blip2Processor` with `save_pretrained`. Its captions are random
words: anything that shows them must say they come from a random-init model.
"""

from __future__ import annotations

from pathlib import Path

TINY_SENTENCES = [
    "a photo of a dog on the beach",
    "a photo of a cat sitting on a red sofa",
    "a painting of a mountain lake at sunset",
    "an old church in a small village",
    "a bowl of fruit on a wooden table",
    "a man riding a bicycle down the street",
    "two children playing in the snow",
    "a bird perched on a branch in the forest",
]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3: bos/eos share "</s>" (id 2)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(vocab_size: int | None = None) -> object:
    """A word-level OPT-style tokenizer (`</s>` prepended) trained on a few sentences.

    `vocab_size` pads the vocabulary with dummy words so that every id a
    random-init model can emit decodes to text (the benchmark uses OPT's 50265).
    Returns a `PreTrainedTokenizerFast` (typed loosely: transformers is imported lazily).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(TINY_SENTENCES, trainer=trainer)
    if vocab_size is not None and tok.get_vocab_size() < vocab_size:
        vocab = tok.get_vocab()
        vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
        tok.model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def build_processor(
    image_size: int, num_query_tokens: int, vocab_size: int | None = None
) -> object:
    """`Blip2Processor` = BLIP image processor (CLIP mean/std, bicubic) + the toy tokenizer."""
    from transformers import Blip2Processor, BlipImageProcessor

    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return Blip2Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(vocab_size),
        num_query_tokens=num_query_tokens,
    )


def tiny_blip2_config(vocab_size: int, image_token_index: int, image_size: int = 32) -> object:
    """Blip2Config with toy ViT / Q-Former / OPT sub-configs (same wiring as the real one)."""
    from transformers import Blip2Config, OPTConfig

    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        init_std=0.5,
    )
    return Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
            "cross_attention_frequency": 1,
            "vocab_size": 64,
        },
        text_config=text.to_dict(),
        num_query_tokens=8,
        image_token_index=image_token_index,
    )


def build_tiny_blip2(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random-init `Blip2ForConditionalGeneration` + processor to `out_dir`.

    The directory looks like a downloaded snapshot (config.json, safetensors,
    tokenizer and processor files), so the stage loads it through the same code
    as real weights. Deterministic for a given `seed`.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_size = 32
    processor = build_processor(image_size=image_size, num_query_tokens=8)
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = max(len(tokenizer), image_token_index + 1)
    config = tiny_blip2_config(vocab_size, image_token_index, image_size)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)  # type: ignore[arg-type]
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)  # type: ignore[attr-defined]
    return out
