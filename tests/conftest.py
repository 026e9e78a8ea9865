from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tweeteval"


def tweet_texts(n: int = 200) -> list[str]:
    """Real tweets from ../shared when present (read, never copied), else a small stand-in."""
    path = SHARED_DATA / "sentiment" / "train.csv"
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            return [row["text"] for _, row in zip(range(n), csv.DictReader(f))]
    return [f"sample text number {i} about the weather and football" for i in range(n)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on tweets, saved as a normal HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tweet_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=320,
        n_positions=64,
        num_labels=3,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


@pytest.fixture
def gpt2_cls():
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    return GPT2ForSequenceClassification(tiny_gpt2_config())


@pytest.fixture
def gpt2_lm():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config())


def train_steps(model, optimizer, scheduler=None, steps: int = 2, vocab: int = 320) -> None:
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 8))
        out = (
            model(ids, labels=torch.tensor([0, 1]))
            if hasattr(model.config, "num_labels")
            and "SequenceClassification" in type(model).__name__
            else model(ids, labels=ids)
        )
        out.loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # No model hub here: any accidental download must fail fast, not hang.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def load_bench(name: str):
    """Import ``bench/<name>.py`` as the module ``name`` (bench scripts import siblings)."""
    import importlib

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)
