"""Build a small CLIP-format BPE tokenizer offline.

OpenAI's CLIP tokenizer cannot be downloaded here, so the offline backbone gets its own: a
byte-level BPE in exactly the format ``transformers.CLIPTokenizer`` reads (``vocab.json`` +
``merges.txt``, ``</w>`` end-of-word suffix, lower-casing, CLIP's word-splitting regex) with
OpenAI's vocabulary layout: 256 byte symbols, the same 256 with ``</w>``, one token per merge,
then ``<|startoftext|>`` and ``<|endoftext|>`` last. Keeping EOS as the largest id matters:
CoOp-style code finds the EOS position with ``argmax`` over token ids.

The merges are learned here rather than by ``tokenizers.trainers.BpeTrainer`` because that
trainer breaks ties between equally frequent pairs in hash-map order, which differs between
processes (observed with tokenizers 0.23): the vocabulary, and with it every backbone weight,
would not be reproducible. Words are still cut by the tokenizer's own normaliser and
pre-tokeniser, so training and use see the same pieces.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from dpfpl_app.data.offline_data import get_dataset

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
"""CLIP's text context: CoOp prompts ``[SOS] 16 ctx  classname . [EOS]`` must fit in it."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a bad photo of the {}.",
)
"""Prompt templates in common use (CLIP/CoOp style) so their words are single tokens too."""

_ALPHABET_LINE = "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9"


LEGACY_VOCABULARY: tuple[str, ...] = ("digits", "fashion-mnist")
"""The corpus of the first backbones' tokenizers (see ``BackboneSpec.vocabulary``)."""


def caption_corpus(datasets: tuple[str, ...] = LEGACY_VOCABULARY) -> list[str]:
    """The captions a tokenizer learns from: each class name of ``datasets`` in each template."""
    corpus: list[str] = []
    for spec in (get_dataset(name) for name in datasets):
        for template in spec.caption_templates + GENERIC_TEMPLATES:
            corpus.extend(template.format(name) for name in spec.class_names)
    corpus.append(_ALPHABET_LINE)
    return corpus


def learn_bpe_merges(
    word_counts: Counter[str], *, min_frequency: int = 2, max_merges: int = 4000
) -> list[tuple[str, str]]:
    """Learn BPE merges deterministically: most frequent pair first, ties by smallest pair.

    Parameters
    ----------
    word_counts
        Pre-tokenised words (already in byte-level symbols) and how often each occurs.
    min_frequency
        Stop when the most frequent pair occurs fewer times than this.
    max_merges
        Upper bound on the number of merges (the vocabulary grows by at most this much).

    Returns
    -------
    list of tuple
        Merges in the order they must be applied; the last symbol of each word carries
        the ``</w>`` suffix, as CLIP's BPE expects.

    """
    words = {tuple(word[:-1]) + (word[-1] + END_OF_WORD,): count
             for word, count in word_counts.items() if word}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best, best_count = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        if best_count < min_frequency:
            break
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every left-to-right occurrence of ``pair`` in ``symbols`` by its concatenation."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _empty_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer with no vocabulary: only its normaliser and pre-tokeniser are used."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer()


def build_vocabulary(corpus: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn a caption corpus into a CLIP-layout vocabulary and its merges.

    The 512 byte-level base symbols make any text encodable (no unknown tokens); merges
    learned from ``corpus`` make its words short; the two special tokens come last.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    backend = _empty_clip_tokenizer().backend_tokenizer
    word_counts: Counter[str] = Counter()
    for text in corpus:
        normalised = backend.normalizer.normalize_str(text)
        word_counts.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalised))
    merges = learn_bpe_merges(word_counts)
    byte_symbols = sorted(ByteLevel.alphabet())  # 256 symbols, one per byte, in code-point order
    tokens = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:  # two merge paths can spell the same token
            seen.add(left + right)
            tokens.append(left + right)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tokenizer(out_dir: Path, vocabulary: tuple[str, ...] = LEGACY_VOCABULARY) -> Path:
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt``, HF tokenizer files) to ``out_dir``.

    Loadable with ``CLIPTokenizer.from_pretrained(out_dir)`` and ``AutoTokenizer``;
    ``model_max_length`` is :data:`CONTEXT_LENGTH`; padding uses ``<|endoftext|>`` like
    HF's CLIP checkpoints.

    Returns
    -------
    Path
        ``out_dir``.

    """
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary(caption_corpus(vocabulary))
    # transformers annotates merges as strings, but the BPE model takes (left, right) pairs.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges,  # type: ignore[arg-type]
                              model_max_length=CONTEXT_LENGTH)
    tokenizer.save_pretrained(out_dir)
    # The classic pair that CLIP tools (and older transformers) read directly.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        encoding="utf-8")
    logger.info("wrote a %d-token CLIP BPE tokenizer (%d merges) to %s", len(vocab), len(merges),
                out_dir)
    return out_dir
