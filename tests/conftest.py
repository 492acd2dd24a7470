"""Tiny randomly initialised models (built offline, in seconds) shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tiny models gain nothing from intra-op threads; one thread keeps the suite fast on a busy 2-core machine
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

WORDS = (
    "a an the man woman dog cat child children is are was were playing eating running sitting on in at "
    "with and or of to guitar piano ball park street house car food water river tree small big red blue "
    "green yellow black white happy sad fast slow plays eats runs sits walks talks reads writes book "
    "sentence word people group two three one outside inside near under over new old good bad very"
).split()


def write_vocab(folder: Path) -> Path:
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *[f"##{c}" for c in chars]]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def build_tiny_model(folder: Path, arch: str = "bert", *, layers: int = 4, hidden: int = 32) -> Path:
    """Save a tiny random ``arch`` model with a word-piece tokenizer into ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(folder)
    # the vocabulary as the first positional argument: transformers 5 ignores the vocab_file= keyword
    tokenizer = BertTokenizerFast(str(vocab), do_lower_case=True, model_max_length=128)
    assert tokenizer.vocab_size > 100, "tiny tokenizer lost its vocabulary"
    common = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=130)
    torch.manual_seed(0)
    if arch == "bert":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=2 * hidden, **common))
    elif arch == "distilbert":
        from transformers import DistilBertConfig, DistilBertModel

        model = DistilBertModel(DistilBertConfig(dim=hidden, n_layers=layers, n_heads=4, hidden_dim=2 * hidden,
                                                 **common))
    elif arch == "mpnet":
        from transformers import MPNetConfig, MPNetModel

        model = MPNetModel(MPNetConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                       intermediate_size=2 * hidden, pad_token_id=0, **common))
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("bert", "distilbert", "mpnet")}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs: dict[str, Path]) -> Path:
    """Folder of a tiny random BERT (4 layers, hidden 32)."""
    return tiny_dirs["bert"]


@pytest.fixture()
def tiny_model(tiny_dir: Path):
    from matryoshka2d import MatryoshkaEncoder

    return MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").eval()


@pytest.fixture(scope="session")
def heads_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT (mean pooling) with trained-looking (random, non-identity) linear exit heads on layers 1..3,
    saved as ``tiny-heads`` (so served exits and exported graphs carry heads)."""
    from matryoshka2d import MatryoshkaEncoder

    model = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean")
    model.add_exit_heads("linear")
    torch.manual_seed(3)
    for head in model.exit_heads.values():
        torch.nn.init.normal_(head.weight, std=0.3)
    return model.save(tmp_path_factory.mktemp("serve") / "tiny-heads")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


SENTENCES = [
    "a man is playing the guitar",
    "the dog runs in the park",
    "two children are eating food",
    "",
    "a very very very long sentence with many many words about a small red car near the old house",
    "cat",
    "the woman reads a book outside under a big green tree",
]
