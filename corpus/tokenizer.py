"""Train a small byte-level BPE tokenizer with ``tokenizers`` and save it as a Hugging Face tokenizer."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Order fixes the ids: unk 0, bos 1, eos 2 (as in the Llama configs), pad 3.
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(train_file: Path, out_dir: Path, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``train_file``, save to ``out_dir`` (loadable by ``AutoTokenizer``) and return it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30, **SPECIAL_TOKENS)
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok
