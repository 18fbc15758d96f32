"""FP8 settings are checked on CPU before any GPU work: each impossible setting is named."""

import pytest

from megatron_hapo.models import decoder_spec
from megatron_hapo.models.precision import FP8Config, check_fp8, fp8_transformer_settings

HOPPER, BLACKWELL, AMPERE = (9, 0), (10, 0), (8, 0)


def spec(hidden=256, ffn=512, layers=4):
    return decoder_spec(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 1000,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 8,
            "intermediate_size": ffn,
        }
    )


def test_plain_bf16_needs_no_gpu():
    check_fp8(FP8Config(), spec(), capability=None)
    assert fp8_transformer_settings(FP8Config()) == {}


def test_valid_settings_map_to_megatron_fields():
    cfg = FP8Config(fp8="hybrid", recipe="tensorwise", bf16_layers_start=1, bf16_layers_end=2)
    check_fp8(cfg, spec(), pp=2, capability=HOPPER)
    settings = fp8_transformer_settings(cfg)
    assert settings["fp8"] == "hybrid" and settings["first_last_layers_bf16"] is True
    assert settings["num_layers_at_end_in_bf16"] == 2


@pytest.mark.parametrize(
    ("cfg", "model", "capability", "message"),
    [
        (FP8Config(fp8="e4m3"), spec(), None, "CUDA GPU"),
        (FP8Config(fp8="e4m3"), spec(), AMPERE, "compute capability"),
        (FP8Config(fp8="e4m3", recipe="mxfp8"), spec(), HOPPER, "compute capability"),
        (FP8Config(fp8="e4m3", recipe="blockwise"), spec(), BLACKWELL, "Hopper only"),
        (FP8Config(fp8="e4m3", recipe="blockwise"), spec(hidden=192), HOPPER, "hidden_size=192"),
        (FP8Config(fp8="e4m3"), spec(ffn=520), HOPPER, "intermediate_size=520"),
        (FP8Config(fp8="e4m3", recipe="delayed", bf16_layers_start=1), spec(), HOPPER, "delayed cannot keep"),
        (FP8Config(fp8="e4m3", bf16_layers_start=3), spec(layers=4), HOPPER, "exceed the 2 layers"),
    ],
)
def test_impossible_settings_are_named(cfg, model, capability, message):
    with pytest.raises(ValueError, match=message):
        check_fp8(cfg, model, pp=2, capability=capability)


def test_delayed_recipe_defaults_to_no_bf16_layers():
    """The run config's ``model.fp8_recipe=delayed`` builds FP8Config with the defaults: it must not be refused,
    and Megatron must not be asked for first / last bf16 layers (its TransformerConfig raises for delayed)."""
    cfg = FP8Config(fp8="e4m3", recipe="delayed")
    check_fp8(cfg, spec(), pp=1, capability=HOPPER)
    assert fp8_transformer_settings(cfg)["first_last_layers_bf16"] is False
    assert FP8Config(fp8="e4m3").bf16_layers() == (1, 1)


def test_fusions_follow_the_layer_spec_and_what_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transformer Engine builds fuse RoPE and SwiGLU; gradient-accumulation fusion also needs Megatron's DDP (the
    main gradient) and apex's kernel; the local spec (CPU) fuses nothing."""
    from megatron_hapo.models import provider

    assert not any(provider.fusion_settings(te=False, ddp=True).values())
    for kernel, ddp, expected in ((True, True, True), (True, False, False), (False, True, False)):
        monkeypatch.setattr(provider, "_wgrad_kernel_imports", lambda kernel=kernel: kernel)
        fused = provider.fusion_settings(te=True, ddp=ddp)
        assert fused == {
            "apply_rope_fusion": True,
            "bias_activation_fusion": True,
            "gradient_accumulation_fusion": expected,
        }, (kernel, ddp)
