"""Pivotal tuning's new token embeddings (plugin.pivotal): only their rows train, the file is textual
inversion's, and diffusers' own `load_textual_inversion` reads it back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plugin.pivotal import (
    IdentifierEmbeddings,
    identifier_tokens,
    load_embeddings,
    read_embeddings,
    replace_identifier,
    save_embeddings,
)
from tests.dreambooth_fixtures import build_tiny_pipeline


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("pivotal") / "tiny-sd")


def encoder_pair(base: Path):
    from transformers import CLIPTextModel, CLIPTokenizer

    return (
        CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
    )


def encode(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    ids = tokenizer(
        prompt,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return text_encoder(ids.input_ids)[0]


def trained_pair(base: Path, steps: int = 3):
    """A tokenizer and text encoder whose `<s0><s1>` took `steps` AdamW steps (weight decay on)."""
    tokenizer, text_encoder = encoder_pair(base)
    pivotal = IdentifierEmbeddings([(tokenizer, text_encoder)], identifier_tokens(2), seed=0)
    optimizer = torch.optim.AdamW(pivotal.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        encode(tokenizer, text_encoder, "a <s0><s1> circle").square().mean().backward()
        optimizer.step()
        pivotal.restore()
        optimizer.zero_grad()
    return tokenizer, text_encoder, pivotal


def test_only_the_new_rows_train_and_other_prompts_keep_their_meaning(base):
    tokenizer, text_encoder, pivotal = trained_pair(base)
    _, untouched = encoder_pair(base)
    old = untouched.get_input_embeddings().weight
    new = text_encoder.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 2
    torch.testing.assert_close(new[: old.shape[0]], old, rtol=0, atol=0)  # decay and momentum undone
    assert not torch.allclose(new[-2:], pivotal.originals[0][-2:])  # the new rows moved
    with torch.no_grad():
        for prompt in ["a circle", "a sks circle on a blue background", ""]:
            torch.testing.assert_close(
                encode(tokenizer, text_encoder, prompt), encode(tokenizer, untouched, prompt), rtol=0, atol=0
            )


def test_the_file_loads_into_a_pipeline_through_diffusers_textual_inversion(base, tmp_path):
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder, pivotal = trained_pair(base)
    path = save_embeddings(tmp_path / "embeddings.safetensors", pivotal.state(), pivotal.tokens, "sks")
    tensors, tokens, word = read_embeddings(path)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (2, 32)
    assert tokens == ["<s0>", "<s1>"] and word == "sks"

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    size = len(pipe.tokenizer)
    assert load_embeddings(pipe, path) == (tokens, word)
    prompt = replace_identifier("a sks circle", word, tokens)
    assert prompt == "a <s0><s1> circle"
    with torch.no_grad():
        loaded = encode(pipe.tokenizer, pipe.text_encoder, prompt)
        torch.testing.assert_close(loaded, encode(tokenizer, text_encoder, prompt), rtol=0, atol=1e-6)
    pipe.unload_textual_inversion()
    assert len(pipe.tokenizer) == size


def test_a_file_that_is_not_an_embeddings_file_is_refused_naming_it(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"emb_params": torch.zeros(2, 8)}, plain)
    with pytest.raises(ValueError, match=r"plain\.safetensors: no 'tokens'/'replaces' metadata"):
        read_embeddings(plain)
    bad = tmp_path / "bad.safetensors"
    save_file({"emb_params": torch.zeros(3, 8)}, bad, metadata={"tokens": "<s0> <s1>", "replaces": "sks"})
    with pytest.raises(
        ValueError, match=r"bad\.safetensors: emb_params has shape \(3, 8\), expected \(2, width\)"
    ):
        read_embeddings(bad)
    odd = tmp_path / "odd.safetensors"
    save_file({"clip_x": torch.zeros(2, 8)}, odd, metadata={"tokens": "<s0> <s1>", "replaces": "sks"})
    with pytest.raises(ValueError, match=r"odd\.safetensors: keys \['clip_x'\]"):
        read_embeddings(odd)


def test_tokens_the_tokenizer_already_has_are_refused(base):
    tokenizer, text_encoder = encoder_pair(base)
    with pytest.raises(ValueError, match="already has the tokens"):
        IdentifierEmbeddings([(tokenizer, text_encoder)], ["a</w>"])


def test_the_identifier_is_replaced_only_as_a_word_of_its_own():
    tokens = identifier_tokens(2)
    assert (
        replace_identifier("a sks dog, who asks for sks.", "sks", tokens)
        == "a <s0><s1> dog, who asks for <s0><s1>."
    )
    assert replace_identifier("a <s0><s1> dog", "".join(tokens), ["sks"]) == "a sks dog"  # and back
