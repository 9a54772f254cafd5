"""Tiny models with random weights that real vLLM serves on a CPU, for `make e2e`: no model can
be downloaded here, and the router's end-to-end tests need the engines, not good answers.

`python tests/e2e/build_models.py llama|whisper DIR`, with the vLLM virtualenv's Python (it
needs torch and transformers). A model is written once: DIR/READY comes last, so a
half-written directory is never taken for a model.

- `llama`: about a million parameters, head dim 64 (vLLM's CPU attention refuses 16), a
  word-level tokenizer over a small vocabulary and a plain chat template.
- `whisper`: one layer each side, d_model 128 (head dim 64); a byte-level BPE with no merges
  (256 byte tokens) followed by Whisper's special tokens in Whisper's order, so vLLM's prompt
  `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>` tokenizes as on a real model;
  the generation config vLLM reads (`lang_to_id`, `task_to_id`, `no_timestamps_token_id`).
  Random weights give every token a logit near 0, so an answer would be 444 random tokens,
  mostly timestamps that decode to nothing. So the answer is set: the rows of the tokens of
  `ANSWER` and of end-of-text in the embedding (which is also the output projection) are
  made long, and the decoder's position embeddings point at them in turn, the answer's
  positions first, then end-of-text at every later position: every transcription is
  "hello", then ends.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

# --- llama ---------------------------------------------------------------------------------------

WORDS = (
    "the a an and or but if then so of to in on at for with by from as is are was were be "
    "been it this that these those he she they we you i me my your our their what which who "
    "when where why how all any some no not yes one two three four five six seven eight nine "
    "ten hello hi say something tell story about model router engine token stream request "
    "answer question time day night light dark red green blue big small fast slow good bad "
    "new old first last next more less many few very much up down out over under again"
).split()
SPECIAL = ("<unk>", "<s>", "</s>", "user:", "assistant:", "system:", ".", ",", "?", "!")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{{ message['content'] }} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_llama(directory: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate((*SPECIAL, *WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocabulary), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)


# --- whisper -------------------------------------------------------------------------------------

PROMPT_TOKENS = 4
"""`<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`: the last one predicts the
first token of the answer."""
ANSWER = "hello"


def byte_vocabulary() -> dict[str, int]:
    """GPT-2's byte-to-unicode map: one token per byte, as byte-level BPE spells them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): index for index, code in enumerate(
        code for _, code in sorted(zip(printable, codes)))}


def special_tokens() -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return ["<|endoftext|>", "<|startoftranscript|>",
            *(f"<|{code}|>" for code in LANGUAGES),
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
            "<|nospeech|>", "<|notimestamps|>",
            *(f"<|{step * 0.02:.2f}|>" for step in range(1501))]


def build_whisper(directory: Path) -> None:
    import torch
    from transformers import (
        GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
        WhisperProcessor, WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = byte_vocabulary()
    (directory / "vocab.json").write_text(json.dumps(vocabulary))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    specials = special_tokens()
    tokenizer = WhisperTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                 unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    assert ids["<|endoftext|>"] == len(vocabulary), ids["<|endoftext|>"]
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                                 tokenizer=tokenizer)

    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=128,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=start, bos_token_id=end, eos_token_id=end, pad_token_id=end,
        begin_suppress_tokens=None, suppress_tokens=None, torch_dtype="float32",
    )
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        decoder = model.model.decoder
        tokens = [vocabulary[letter] for letter in ANSWER] + [end]
        for token in set(tokens):
            # Made long (end-of-text's row starts as zeros: it is also the padding token).
            decoder.embed_tokens.weight[token] = torch.randn(config.d_model) * 0.3
        first = PROMPT_TOKENS - 1
        for offset, token in enumerate(tokens):
            towards = decoder.embed_tokens.weight[token] * 30.0
            if token == end:
                decoder.embed_positions.weight[first + offset:] += towards
            else:
                decoder.embed_positions.weight[first + offset] += towards
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end,
        max_length=448, is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


BUILDERS: dict[str, Callable[[Path], None]] = {"llama": build_llama, "whisper": build_whisper}


def main() -> None:
    kind, directory = sys.argv[1], Path(sys.argv[2])
    if not (directory / "READY").exists():
        BUILDERS[kind](directory)
        (directory / "READY").write_text("ok\n")
    print(directory)


if __name__ == "__main__":
    main()
