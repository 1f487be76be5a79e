"""CoOpTextEncoder: the shared-prefix, truncated fast path against full 77-token references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.method.text_encoder import CoOpTextEncoder

# class names of very different token lengths (1 to 11 tokens with the period)
CLASS_NAMES = ("x", "cat", "great white shark", "hippopotamus", "sea lion pup")
TEMPLATE = "a photo of a"


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _suffix_lengths(clip: FrozenClip, names: tuple[str, ...]) -> list[int]:
    return [len(clip.tokenizer(f"{n}.", add_special_tokens=False)["input_ids"]) for n in names]


def test_plumbing_clip_has_real_depth_and_varied_class_lengths(clip: FrozenClip) -> None:
    # Prepare / Execute
    layers = clip.model.config.text_config.num_hidden_layers
    lengths = _suffix_lengths(clip, CLASS_NAMES)

    # Assert: the equivalence tests below exercise several layers and several suffix lengths
    assert layers >= 4
    assert len(set(lengths)) >= 4, lengths


@pytest.mark.parametrize("n_ctx", [1, 4, 16])
def test_fast_features_equal_plain_77_token_features(clip: FrozenClip, n_ctx: int) -> None:
    # Prepare: a context at the token embeddings' scale (std 0.02) and a larger one
    encoder = CoOpTextEncoder(clip.model, clip.tokenizer, CLASS_NAMES, n_ctx)
    g = torch.Generator().manual_seed(n_ctx)
    for scale in (0.02, 1.0):
        ctx = torch.randn(n_ctx, clip.text_width, generator=g) * scale

        # Execute
        with torch.no_grad():
            fast = encoder(ctx)
            plain = encoder.plain_features(ctx, clip.model.text_model)

        # Assert
        assert fast.shape == (len(CLASS_NAMES), clip.model.config.projection_dim)
        torch.testing.assert_close(fast, plain, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(fast.norm(dim=1), torch.ones(len(CLASS_NAMES)))


def test_fast_path_gradient_equals_plain_gradient(clip: FrozenClip) -> None:
    # Prepare: a fixed random readout of the features, so both paths get the same cotangent
    n_ctx = 4
    encoder = CoOpTextEncoder(clip.model, clip.tokenizer, CLASS_NAMES, n_ctx)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(n_ctx, clip.text_width, generator=g) * 0.02
    readout = torch.randn(len(CLASS_NAMES), clip.model.config.projection_dim, generator=g)

    def grad_of(features_fn: object) -> torch.Tensor:
        x = ctx.clone().requires_grad_(True)
        (features_fn(x) * readout).sum().backward()  # type: ignore[operator]
        return x.grad  # type: ignore[return-value]

    # Execute
    fast = grad_of(encoder)
    plain = grad_of(lambda x: encoder.plain_features(x, clip.model.text_model))

    # Assert
    # float32 sums in another order: one element in 512 differed by 4e-6 on this machine's
    # kernels; a wrong path differs by the gradient's own size (~1e-2)
    torch.testing.assert_close(fast, plain, atol=2e-5, rtol=1e-3)
    assert fast.abs().max() > 1e-3


def test_template_context_reproduces_clip_text_features_of_the_sentence(clip: FrozenClip) -> None:
    # Prepare: ctx = the token embeddings of "a photo of a"; reference = CLIP's own text
    # tower on the tokenized sentence "a photo of a <class>." (padded to 77 tokens)
    template_ids = clip.tokenizer(TEMPLATE, add_special_tokens=False)["input_ids"]
    table = clip.model.text_model.embeddings.token_embedding.weight
    ctx = table[torch.tensor(template_ids)].detach()
    encoder = CoOpTextEncoder(clip.model, clip.tokenizer, CLASS_NAMES, len(template_ids))
    sentences = [f"{TEMPLATE} {name}." for name in CLASS_NAMES]
    tokens = clip.tokenizer(sentences, padding="max_length", max_length=77, return_tensors="pt")

    # Execute
    with torch.no_grad():
        fast = encoder(ctx)
        out = clip.model.get_text_features(input_ids=tokens["input_ids"])
    reference = getattr(out, "pooler_output", out)

    # Assert
    torch.testing.assert_close(fast, F.normalize(reference, dim=-1), atol=2e-6, rtol=1e-5)


def test_encoder_has_no_trainable_parameters_and_leaves_clip_untouched(clip: FrozenClip) -> None:
    # Prepare
    before = {k: v.clone() for k, v in clip.model.text_model.state_dict().items()}
    encoder = CoOpTextEncoder(clip.model, clip.tokenizer, CLASS_NAMES, 4)
    ctx = torch.randn(4, clip.text_width, requires_grad=True)

    # Execute
    encoder(ctx).sum().backward()

    # Assert: only the context receives a gradient; CLIP's weights are unchanged
    assert all(not p.requires_grad for p in encoder.parameters())
    assert all(p.grad is None for p in clip.model.parameters())
    after = clip.model.text_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_class_name_overflowing_the_context_raises_naming_class_and_n_ctx(
    clip: FrozenClip,
) -> None:
    # Prepare: "hippopotamus." is 11 tokens + EOS; with SOS and 60 context tokens: 73 fits,
    # a name three times as long does not
    long_name = "hippopotamus hippopotamus hippopotamus"
    CoOpTextEncoder(clip.model, clip.tokenizer, ("hippopotamus",), 60)  # fits: no error

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"class name '{long_name}'.*n-ctx=60"):
        CoOpTextEncoder(clip.model, clip.tokenizer, ("cat", long_name), 60)


def test_no_class_names_raises(clip: FrozenClip) -> None:
    with pytest.raises(ValueError, match="class_names is empty"):
        CoOpTextEncoder(clip.model, clip.tokenizer, (), 4)
