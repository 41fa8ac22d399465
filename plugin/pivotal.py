"""Pivotal tuning: the subject's identifier learnt as new token embeddings, the text encoders kept as they are.

Adapting a text encoder to a DreamBooth subject changes what every prompt means: in benchmarks/quality.py
prompt following on prompts without the identifier fell to 0.5-0.7 of the base's, mostly through the
text encoder's adapters. New tokens (`<s0><s1>` in place of the identifier, as diffusers' advanced
DreamBooth scripts do) change only the prompts that use them.

The embeddings are saved in the textual-inversion format that diffusers' `load_textual_inversion`,
AUTOMATIC1111 and ComfyUI read: one tensor `[tokens, width]` per text encoder, under `emb_params` for a
single encoder and `clip_l`/`clip_g` for SDXL's pair. The tokens and the word they replace ride in the
file's metadata.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .files import save_atomically

EMBEDDINGS_FILENAME = "embeddings.safetensors"
# The file's key of each text encoder, by how many the model has (the names readers look for).
KEYS = {1: ("emb_params",), 2: ("clip_l", "clip_g")}


def identifier_tokens(count: int) -> list[str]:
    """The new tokens that stand for the identifier: `<s0>`, `<s1>`, ... (diffusers' names)."""
    return [f"<s{i}>" for i in range(count)]


def _as_a_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def mentions(prompt: str, word: str) -> bool:
    """Whether `prompt` has `word` as a word of its own ("sks" is not in "asks")."""
    return _as_a_word(word).search(prompt) is not None


def replace_identifier(prompt: str, word: str, tokens: Sequence[str]) -> str:
    """`prompt` with every `word` (the identifier, e.g. "sks", as a word of its own) written as the new tokens."""
    return _as_a_word(word).sub(lambda _: "".join(tokens), prompt)


class IdentifierEmbeddings:
    """New tokens in each (tokenizer, text encoder) pair, their embedding rows trainable.

    The whole input-embedding matrix takes gradients (a text encoder looks its rows up by index);
    `restore()` puts every other row back after each optimizer step, so only the new rows ever move.
    """

    def __init__(self, pairs: Sequence[tuple], tokens: Sequence[str], seed: int = 0):
        if len(pairs) not in KEYS:
            raise ValueError(f"pivotal tuning supports 1 or 2 CLIP text encoders, got {len(pairs)}")
        self.tokens = list(tokens)
        self.keys = KEYS[len(pairs)]
        self.embeddings: list[nn.Embedding] = []
        self.ids: list[torch.Tensor] = []
        self.originals: list[torch.Tensor] = []
        generator = torch.Generator().manual_seed(seed)
        for tokenizer, text_encoder in pairs:
            taken = [token for token in self.tokens if token in tokenizer.get_vocab()]
            if taken:
                raise ValueError(f"the tokenizer already has the tokens {taken}: pick other names")
            tokenizer.add_tokens(self.tokens)
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
            embedding = text_encoder.get_input_embeddings()
            ids = torch.tensor(tokenizer.convert_tokens_to_ids(self.tokens))
            dtype = embedding.weight.dtype
            with torch.no_grad():
                # diffusers' start: random rows at the spread of the words the encoder knows.
                known = embedding.weight[: int(ids.min())].float()
                rows = torch.randn(len(ids), embedding.embedding_dim, generator=generator) * known.std()
                embedding.weight.data = embedding.weight.data.float()  # trained in float32
                embedding.weight[ids.to(embedding.weight.device)] = rows.to(embedding.weight.device)
            embedding.weight.requires_grad_(True)
            if dtype != torch.float32:
                # The rows train in float32, the encoder runs in its own precision: a float32 input would
                # meet its half-precision layer norms (which a CPU refuses, outside autocast).
                embedding.register_forward_hook(lambda module, args, output, dtype=dtype: output.to(dtype))
            self.embeddings.append(embedding)
            self.ids.append(ids.to(embedding.weight.device))
            self.originals.append(embedding.weight.detach().clone())

    def parameters(self) -> list[nn.Parameter]:
        return [embedding.weight for embedding in self.embeddings]

    @torch.no_grad()
    def restore(self) -> None:
        """Every row but the new tokens' back to the base's (the optimizer moved them: decay, momentum)."""
        for embedding, ids, original in zip(self.embeddings, self.ids, self.originals):
            rows = embedding.weight[ids].clone()
            embedding.weight.copy_(original)
            embedding.weight[ids] = rows

    def state(self) -> dict[str, torch.Tensor]:
        """The new tokens' rows, by the file's keys, on the CPU in float32."""
        return {
            key: embedding.weight[ids].detach().float().cpu().contiguous()
            for key, embedding, ids in zip(self.keys, self.embeddings, self.ids)
        }

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, embedding, ids in zip(self.keys, self.embeddings, self.ids):
            embedding.weight[ids] = tensors[key].to(embedding.weight)


def save_embeddings(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], tokens: Sequence[str], word: str
) -> Path:
    """Write the embeddings file atomically (the adapter files' own save: a temporary file, then a rename)."""
    return save_atomically(tensors, {"tokens": " ".join(tokens), "replaces": word}, path)


def read_embeddings(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The tensors, the tokens and the word they replace, checked against each other."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tokens = metadata.get("tokens", "").split()
    if not tokens or "replaces" not in metadata:
        raise ValueError(f"{path}: no 'tokens'/'replaces' metadata; not a pivotal-tuning embeddings file")
    if sorted(tensors) not in [sorted(keys) for keys in KEYS.values()]:
        raise ValueError(f"{path}: keys {sorted(tensors)}, expected {' or '.join(map(str, KEYS.values()))}")
    for key, tensor in tensors.items():
        if tensor.ndim != 2 or tensor.shape[0] != len(tokens):
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, expected ({len(tokens)}, width)"
            )
    return tensors, tokens, metadata["replaces"]


def check_embeddings(pipeline, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Read the embeddings file and check that it fits the pipeline's tokenizers and text encoders, before
    anything changes: all of its tokens new there, or all there already (a run loaded before)."""
    tensors, tokens, word = read_embeddings(path)
    for key, (tokenizer, text_encoder) in zip(KEYS[len(tensors)], _pairs(pipeline, len(tensors))):
        if tokenizer is None or text_encoder is None:
            raise ValueError(
                f"{path}: holds {sorted(tensors)}, but the pipeline has no CLIP text encoder for {key}"
            )
        width = text_encoder.get_input_embeddings().embedding_dim
        if tensors[key].shape[1] != width:
            raise ValueError(
                f"{path}: {key} has width {tensors[key].shape[1]}, the text encoder's is {width}"
            )
        known = [token in tokenizer.get_vocab() for token in tokens]
        if any(known) and not all(known):
            raise ValueError(f"{path}: the tokenizer has some of the tokens {tokens} but not all")
    return tensors, tokens, word


def set_embeddings(pipeline, checked: tuple[dict[str, torch.Tensor], list[str], str]) -> None:
    """Put `check_embeddings`' tokens into the pipeline: through diffusers' `load_textual_inversion` where
    they are new, by replacing their rows where the tokenizers have them (which diffusers refuses)."""
    tensors, tokens, _ = checked
    for key, (tokenizer, text_encoder) in zip(KEYS[len(tensors)], _pairs(pipeline, len(tensors))):
        if tokens[0] not in tokenizer.get_vocab():
            pipeline.load_textual_inversion(
                tensors[key], token=tokens, tokenizer=tokenizer, text_encoder=text_encoder
            )
            continue
        embedding = text_encoder.get_input_embeddings()
        with torch.no_grad():
            embedding.weight[tokenizer.convert_tokens_to_ids(tokens)] = tensors[key].to(embedding.weight)


def _pairs(pipeline, count: int) -> list[tuple]:
    names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")][:count]
    return [
        (getattr(pipeline, tokenizer, None), getattr(pipeline, encoder, None)) for tokenizer, encoder in names
    ]


def load_embeddings(pipeline, path: str | os.PathLike) -> tuple[list[str], str]:
    """The embeddings file into a diffusers pipeline (checked first, then set as `set_embeddings` does);
    returns the tokens and the word they replace. `pipeline.unload_textual_inversion()` takes them out."""
    checked = check_embeddings(pipeline, path)
    set_embeddings(pipeline, checked)
    return checked[1], checked[2]
