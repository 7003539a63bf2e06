"""Conditioning: what the U-Net sees as ``encoder_hidden_states`` (a (B, 1, 768) tensor).

Three encoders behind one interface, ``encoder.encode(prompts) -> (B, 1, 768)``:

* `BertPromptEncoder` — the official scheme: the frozen BERT [CLS] vector of a prompt such
  as ``window width and window level is 1500 and -500.`` (reference §2.4), from a local
  BERT folder (never a hub download).
* `PromptCacheEncoder` — the same vectors read from a prompt → vector table stored beside a
  model, so inference never needs BERT.
* `LearnedConditionEncoder` — for our own models: learned embeddings of the window preset and
  an optional disease label, with a null embedding for condition dropout (classifier-free
  guidance). It also answers to prompt strings built with `condition_prompt`, so every model
  is driven the same way.

Because the context has one token, cross-attention reduces to a per-sample bias: the prompt
acts as a global conditioning vector (reference §2.2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, LCTfoundError
from ..windows import NULL_PROMPT, WINDOWS, get_window

CONDITION_DIM = 768
DISEASE_SEPARATOR = "this image may related to "


def condition_prompt(window: str = "mediastinal", disease: Optional[str] = None) -> str:
    """The prompt string the official pretraining used for a window and an optional disease."""
    prompt = get_window(window).prompt()
    if disease:
        prompt += DISEASE_SEPARATOR + disease
    return prompt


#: Weight files that are pickles (torch.load would run code from them): never loaded.
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def check_safetensors_weights(folder: Path) -> None:
    """Refuse a Hugging Face model folder whose weights are not safetensors, saying how to convert."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    others = sorted(p.name for p in folder.iterdir() if p.name in PICKLED_WEIGHTS or p.suffix in (".bin", ".pt", ".pth",
                                                                                                    ".ckpt"))
    found = f"only {others[0]} was found" if others else "no model.safetensors was found"
    raise CheckpointError(
        f"{folder}: {found}; weights are read only from safetensors (pickled files can run code when loaded). "
        "Convert once in a trusted environment: BertModel.from_pretrained(FOLDER).save_pretrained(FOLDER, "
        "safe_serialization=True)")


class BertPromptEncoder:
    """BERT [CLS] vectors of prompts, from a local BERT folder (transformers)."""

    def __init__(self, bert_folder: str | Path, device: str | torch.device = "cpu"):
        folder = Path(bert_folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: not a BERT folder (config.json missing)")
        check_safetensors_weights(folder)
        from transformers import BertModel, BertTokenizer

        try:
            self.tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
            # use_safetensors: never fall back to torch.load of a pickle.
            self.model = BertModel.from_pretrained(folder, local_files_only=True,
                                                   use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{folder}: cannot load BERT: {error}") from None
        if self.model.config.hidden_size != CONDITION_DIM:
            raise CheckpointError(
                f"{folder}: BERT hidden size {self.model.config.hidden_size}, the model needs {CONDITION_DIM}"
            )
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        vectors = []
        # One prompt at a time with padding=True, as the official code did (no batch padding effects).
        for prompt in prompts:
            tokens = self.tokenizer(prompt, padding=True, truncation=True, return_tensors="pt").to(self.device)
            vectors.append(self.model(**tokens).last_hidden_state[:, 0, :])
        return torch.cat(vectors).unsqueeze(1).float()


class PromptCacheEncoder:
    """Prompt → 768-d vector table stored with a model (``conditioning/prompt_cache.safetensors``)."""

    FILE = "prompt_cache.safetensors"

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = {prompt: vector.reshape(CONDITION_DIM).float() for prompt, vector in table.items()}

    @classmethod
    def build(cls, bert: BertPromptEncoder, prompts: Iterable[str]) -> "PromptCacheEncoder":
        prompts = list(dict.fromkeys(prompts))
        vectors = bert.encode(prompts)[:, 0, :].cpu()
        return cls(dict(zip(prompts, vectors)))

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [prompt for prompt in prompts if prompt not in self.table]
        if missing:
            raise LCTfoundError(
                f"prompt {missing[0]!r} is not in this model's prompt cache "
                f"(cached: {len(self.table)}); add it with `lctfound model add-prompts --bert BERT_FOLDER`"
            )
        return torch.stack([self.table[prompt] for prompt in prompts]).unsqueeze(1)

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        prompts = list(self.table)
        save_file(
            {"embeddings": torch.stack([self.table[p] for p in prompts]).contiguous()},
            str(path),
            metadata={"prompts": json.dumps(prompts, ensure_ascii=False)},
        )
        return path

    @classmethod
    def load(cls, path: Path) -> "PromptCacheEncoder":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                prompts = json.loads((handle.metadata() or {})["prompts"])
                embeddings = handle.get_tensor("embeddings")
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: not a prompt cache ({error})") from None
        if embeddings.shape != (len(prompts), CONDITION_DIM):
            raise CheckpointError(f"{path}: embeddings {tuple(embeddings.shape)} do not match {len(prompts)} prompts")
        return cls(dict(zip(prompts, embeddings)))


class LearnedConditionEncoder(nn.Module):
    """Learned window + disease embeddings summed into one 768-d condition vector.

    Index 0 of both tables is "none"; the window table's index 0 doubles as the null
    condition used for dropout, so classifier-free guidance works exactly as with the
    official ``freedom.`` prompt. ``dropout`` records the null-prompt probability of training;
    the training data applies it (seeded per item, so resumed runs stay identical).
    """

    FILE = "condition_encoder.safetensors"

    def __init__(self, windows: Sequence[str] = tuple(WINDOWS), diseases: Sequence[str] = (),
                 dropout: float = 0.05):
        super().__init__()
        self.windows = list(windows)
        self.diseases = list(diseases)
        self.dropout = float(dropout)
        self.window_embedding = nn.Embedding(len(self.windows) + 1, CONDITION_DIM)
        self.disease_embedding = nn.Embedding(len(self.diseases) + 1, CONDITION_DIM)
        nn.init.normal_(self.window_embedding.weight, std=0.02)
        nn.init.zeros_(self.disease_embedding.weight)

    def config(self) -> dict:
        return {"windows": self.windows, "diseases": self.diseases, "dropout": self.dropout}

    def indices(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map official-style prompts (or bare window names) to (window, disease) indices."""
        window_index, disease_index = [], []
        prompt_of_window = {get_window(name).prompt(): i + 1 for i, name in enumerate(self.windows)}
        for prompt in prompts:
            if prompt in (NULL_PROMPT, ""):
                window_index.append(0)
                disease_index.append(0)
                continue
            head, _, disease = prompt.partition(DISEASE_SEPARATOR)
            if head in self.windows:
                window = self.windows.index(head) + 1
            elif head in prompt_of_window:
                window = prompt_of_window[head]
            else:
                raise LCTfoundError(f"this model knows the windows {self.windows}, not the prompt {prompt!r}")
            if disease and disease not in self.diseases:
                raise LCTfoundError(f"this model knows the disease labels {self.diseases}, not {disease!r}")
            window_index.append(window)
            disease_index.append(self.diseases.index(disease) + 1 if disease else 0)
        device = self.window_embedding.weight.device
        return torch.tensor(window_index, device=device), torch.tensor(disease_index, device=device)

    def forward(self, window_index: torch.Tensor, disease_index: torch.Tensor) -> torch.Tensor:
        vectors = self.window_embedding(window_index) + self.disease_embedding(disease_index)
        return vectors.unsqueeze(1)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self(*self.indices(prompts))

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"config": json.dumps(self.config())})
        return path

    @classmethod
    def load(cls, path: Path) -> "LearnedConditionEncoder":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                config = json.loads((handle.metadata() or {})["config"])
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: not a condition encoder ({error})") from None
        encoder = cls(**config)
        try:
            encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{path}: {str(error).splitlines()[0]}") from None
        return encoder.eval()
