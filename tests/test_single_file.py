"""Original-layout single files (SD1, SD2, SDXL) load offline into the exact diffusers models.

Small random diffusers models with reduced UNets but real text-encoder widths are exported with
tests/ldm_export.py and read back with `load_single_file`; every tensor must come back bit-for-bit.
"""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

from textinv_core.host import HostError
from textinv_core.hosts.single_file import SD2_V_PROBE, detect_prediction_type, load_single_file

from .ldm_export import export_single_file

VOCAB = 49408


def _clip(cls, width: int, act: str, **extra):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, **extra,
    )  # fmt: skip
    return cls(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
    ).eval()  # fmt: skip


def _unet(**config):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(in_channels=4, out_channels=4, sample_size=16, **config).eval()


def build(family: str) -> dict:
    """Reduced UNet + small VAE + 1-layer text encoders of the family's real widths."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed({"sd1": 1, "sd2": 2, "sdxl": 3}[family])
    if family == "sd1":  # 2 levels x 1 res block (released: 4 x 2), 8 heads
        unet = _unet(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )  # fmt: skip
        return {"unet": unet, "vae": _vae(), "text_encoder": _clip(CLIPTextModel, 768, "quick_gelu")}
    if family == "sd2":  # 3 levels x 3 res blocks, so output_blocks.11 (the v-prediction probe) exists
        unet = _unet(
            block_out_channels=(32, 64, 64), layers_per_block=3, cross_attention_dim=1024,
            attention_head_dim=[1, 1, 1], use_linear_projection=True, upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )  # fmt: skip
        return {"unet": unet, "vae": _vae(), "text_encoder": _clip(CLIPTextModel, 1024, "gelu")}
    unet = _unet(  # SDXL: no attention on level 0, transformer depths 2 and 3 (released: 2 and 10)
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=2048,
        attention_head_dim=[1, 1, 1], use_linear_projection=True, transformer_layers_per_block=[1, 2, 3],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
    )  # fmt: skip
    return {
        "unet": unet,
        "vae": _vae(),
        "text_encoder": _clip(CLIPTextModel, 768, "quick_gelu"),
        "text_encoder_2": _clip(CLIPTextModelWithProjection, 1280, "gelu", projection_dim=1280),
    }


@pytest.fixture(scope="module")
def models():
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = build(family)
        return cache[family]

    return get


def assert_same_weights(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    a, b = original.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def assert_same_models(components: dict, loaded: dict) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if components.get(name) is None:
            assert loaded[name] is None, name
        else:
            assert_same_weights(components[name], loaded[name])
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "use_linear_projection", "attention_head_dim",
                "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim"):  # fmt: skip
        want, got = components["unet"].config[key], loaded["unet"].config[key]
        assert (list(want) if isinstance(want, tuple) else want) == (
            list(got) if isinstance(got, tuple) else got
        ), key
    for name in ("text_encoder", "text_encoder_2"):
        if components.get(name) is not None:
            for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                        "hidden_act"):  # fmt: skip
                assert getattr(components[name].config, key) == getattr(loaded[name].config, key), (name, key)


# Two module instances with bit-identical weights may still sum in another order (a library picks
# another kernel or memory layout for one of them): about 1e-6 of the output's scale in fp32. A wrong
# head count moves the SD1 UNet's output by about 4e-2 of its scale, and a 0.1% change of one
# attention projection by about 1e-5, so the check allows 1e-5 of the scale: ten times the reordering
# noise, still failing every wrong configuration (test_forward_check_catches_a_wrong_head_count).
FORWARD_TOLERANCE = 1e-5


def assert_same_forward(got: torch.Tensor, want: torch.Tensor, what: str = "output") -> None:
    """Equal up to float reordering: max |got - want| <= FORWARD_TOLERANCE x max |want|."""
    scale = float(want.abs().max().clamp_min(1.0))
    torch.testing.assert_close(got, want, rtol=0.0, atol=FORWARD_TOLERANCE * scale, msg=lambda m: f"{what}: {m}")


def assert_same_unet_output(components: dict, loaded: dict) -> None:
    """Same weights and config must also mean the same forward pass (heads, projections, ...)."""
    torch.manual_seed(0)
    unet = components["unet"]
    sample = torch.randn(1, 4, 16, 16)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        want = unet(sample, 10, context, **extra).sample
        got = loaded["unet"](sample, 10, context, **extra).sample
    assert_same_forward(got, want)


def assert_same_text_output(components: dict, loaded: dict) -> None:
    """The loaded encoders (buffers included) encode a real prompt exactly as the originals."""
    for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if components.get(name) is None:
            continue
        batch = loaded[tok]("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt")
        ids = batch.input_ids
        with torch.no_grad():
            want = components[name](ids, output_hidden_states=True)
            got = loaded[name](ids, output_hidden_states=True)
        assert_same_forward(got.hidden_states[-2], want.hidden_states[-2], name)
        assert_same_forward(got[0], want[0], name)
        if name == "text_encoder_2":
            assert_same_forward(got.text_embeds, want.text_embeds, name)


def test_sd1_safetensors_loads_bit_exact_as_epsilon(models, tmp_path):
    components = models("sd1")
    path = export_single_file(components, "sd1", tmp_path / "sd1.safetensors")
    loaded = load_single_file(path)
    assert (loaded["family"], loaded["prediction_type"]) == ("sd1", "epsilon")
    assert loaded["scheduler"].config.prediction_type == "epsilon"
    assert loaded["scheduler"].config.beta_schedule == "scaled_linear"
    assert loaded["tokenizer"].pad_token == "<|endoftext|>" and loaded["tokenizer_2"] is None
    assert loaded["vae"].config.scaling_factor == pytest.approx(0.18215)
    assert_same_models(components, loaded)
    assert_same_unet_output(components, loaded)
    assert_same_text_output(components, loaded)


def test_models_are_built_without_the_random_init_the_file_replaces():
    """A random init of every weight cost full-size SDXL a minute and a second copy of the model at load
    (benchmarks/single_file_load.py); buffers no file holds (CLIP's position ids) must stay real."""
    from transformers import CLIPTextModel

    from textinv_core.hosts.single_file import _empty_weights

    with _empty_weights():
        built = _clip(CLIPTextModel, 64, "quick_gelu")
        linear = torch.nn.Linear(4, 3)
    assert {p.device.type for p in [*built.parameters(), *linear.parameters()]} == {"meta"}
    assert all(b.device.type == "cpu" for b in built.buffers()) and list(built.buffers())
    assert torch.nn.Linear(4, 3).weight.device.type == "cpu"  # the context is left as it was found


def test_forward_check_catches_a_wrong_head_count(models):
    """The output tolerance is loose enough for float reordering, never for a wrongly configured model."""
    from diffusers import UNet2DConditionModel

    components = models("sd1")
    config = {k: v for k, v in components["unet"].config.items() if not k.startswith("_")}
    for heads in (4, 16):  # the model has 8
        wrong = UNet2DConditionModel(**dict(config, attention_head_dim=heads)).eval()
        wrong.load_state_dict(components["unet"].state_dict())
        with pytest.raises(AssertionError):
            assert_same_unet_output(components, {"unet": wrong})


def test_sd1_ckpt_with_state_dict_and_v_pred_marker_loads_as_v_prediction(models, tmp_path):
    components = models("sd1")
    path = export_single_file(components, "sd1", tmp_path / "sd1.ckpt", v_pred_marker=True)
    loaded = load_single_file(path, family="sd1")
    assert (loaded["family"], loaded["prediction_type"]) == ("sd1", "v_prediction")
    assert loaded["scheduler"].config.prediction_type == "v_prediction"
    assert_same_models(components, loaded)


def test_sd2_v_prediction_is_detected_by_norm_bias_heuristic_and_overridable(models, tmp_path):
    from safetensors import safe_open

    components = models("sd2")
    unet = components["unet"]
    probe = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1.bias
    saved = probe.detach().clone()
    with torch.no_grad():
        probe.copy_(torch.randn(probe.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    try:
        path = export_single_file(components, "sd2", tmp_path / "sd2v.safetensors")
        with safe_open(str(path), "pt") as f:
            assert SD2_V_PROBE in f.keys()
            assert sum(k.startswith("cond_stage_model.model.transformer.resblocks.1.") for k in f.keys()) > 0
        loaded = load_single_file(path)
        assert (loaded["family"], loaded["prediction_type"]) == ("sd2", "v_prediction")
        assert loaded["scheduler"].config.prediction_type == "v_prediction"
        assert loaded["tokenizer"].pad_token == "!" and loaded["tokenizer_2"] is None
        assert loaded["text_encoder"].config.num_hidden_layers == 1  # the file's last block is dropped
        assert_same_models(components, loaded)
        assert_same_unet_output(components, loaded)
        assert_same_text_output(components, loaded)
        assert load_single_file(path, prediction_type="epsilon")["prediction_type"] == "epsilon"
    finally:
        with torch.no_grad():
            probe.copy_(saved)


def test_sdxl_loads_both_encoders_bit_exact(models, tmp_path):
    components = models("sdxl")
    path = export_single_file(components, "sdxl", tmp_path / "sdxl.safetensors")
    loaded = load_single_file(path, prediction_type="v_prediction")
    assert (loaded["family"], loaded["prediction_type"]) == ("sdxl", "v_prediction")
    assert loaded["tokenizer"].pad_token == "<|endoftext|>" and loaded["tokenizer_2"].pad_token == "!"
    assert type(loaded["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert loaded["vae"].config.scaling_factor == pytest.approx(0.13025)
    assert_same_models(components, loaded)
    assert_same_unet_output(components, loaded)
    assert_same_text_output(components, loaded)


def test_prediction_type_detection_rules(caplog):
    noisy = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.2
    assert detect_prediction_type({SD2_V_PROBE: noisy}, "sd2") == "v_prediction"
    assert detect_prediction_type({SD2_V_PROBE: torch.zeros(64)}, "sd2") == "epsilon"
    assert detect_prediction_type({SD2_V_PROBE: noisy}, "sd1") == "epsilon"
    assert detect_prediction_type({"v_pred": torch.tensor([])}, "sdxl") == "v_prediction"
    with caplog.at_level(logging.INFO, logger="textinv_core.hosts.single_file"):
        assert detect_prediction_type({}, "sd2") == "epsilon"
    assert "absent" in caplog.text


class _Payload:
    """Unpickling this would create `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_with_pickled_object_is_refused_without_running_it(tmp_path):
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    (tmp_path / "live.ckpt").write_bytes(pickle.dumps({"state_dict": {"x": _Payload(proof)}}))
    with open(tmp_path / "live.ckpt", "rb") as f:
        pickle.load(f).get("state_dict")["x"].close()
    assert proof.exists()  # the payload is live under a plain unpickler

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1), "x": _Payload(marker)}}, path)
    with pytest.raises(HostError, match="safetensors"):
        load_single_file(path)
    assert not marker.exists()


def test_unknown_layout_and_file_type_are_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "refiner.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(1),
            "conditioner.embedders.0.model.text_projection": torch.zeros(1),
        },
        str(path),
    )
    with pytest.raises(HostError, match=r"unknown checkpoint layout.*conditioner\.embedders"):
        load_single_file(path)
    save_file({"foo.bar": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(HostError, match=r"model\.diffusion_model.*Found: foo\.bar"):
        load_single_file(tmp_path / "lora.safetensors")
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(HostError, match=r"\.safetensors"):
        load_single_file(tmp_path / "model.bin")


def test_family_argument_must_match_the_layout(models, tmp_path):
    path = export_single_file(models("sd1"), "sd1", tmp_path / "sd1.safetensors")
    with pytest.raises(HostError, match="sd1 layout"):
        load_single_file(path, family="sdxl")


_SD_LEVELS = dict(
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    transformer_layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
RELEASED_UNETS = {  # the diffusers configs of SD1.5, SD2.1 (768-v) and SDXL base 1.0
    "sd1": dict(
        _SD_LEVELS, sample_size=64, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False
    ),
    "sd2": dict(
        _SD_LEVELS,
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=[320, 640, 1280],
        layers_per_block=2,
        cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20],
        use_linear_projection=True,
        transformer_layers_per_block=[1, 2, 10],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
RELEASED_TEXT = {  # (class, width, layers, intermediate, act)
    "clip_l": ("CLIPTextModel", 768, 12, 3072, "quick_gelu"),
    "open_clip_h": ("CLIPTextModel", 1024, 23, 4096, "gelu"),  # diffusers drops SD2's last block
    "open_clip_bigg": ("CLIPTextModelWithProjection", 1280, 32, 5120, "gelu"),
}


def released_components(family: str) -> dict:
    """Full-size released architectures with shape-only (meta) weights."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def text(name: str):
        cls, width, layers, intermediate, act = RELEASED_TEXT[name]
        config = transformers.CLIPTextConfig(
            hidden_size=width, num_hidden_layers=layers, intermediate_size=intermediate, hidden_act=act,
            num_attention_heads=width // 64, projection_dim=width,
        )  # fmt: skip
        return getattr(transformers, cls)(config)

    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )  # fmt: skip
        components = {"unet": UNet2DConditionModel(**RELEASED_UNETS[family]), "vae": vae}
        if family == "sd1":
            components["text_encoder"] = text("clip_l")
        elif family == "sd2":
            components["text_encoder"] = text("open_clip_h")
        else:
            components |= {"text_encoder": text("clip_l"), "text_encoder_2": text("open_clip_bigg")}
    return components


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_released_architectures_infer_the_released_diffusers_configs(family):
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    from textinv_core.hosts.single_file import components_from_state_dict

    from .ldm_export import to_ldm_state_dict

    components = released_components(family)
    sd = to_ldm_state_dict(components, family)
    marker = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    assert CHECKPOINT_KEY_NAMES[marker] in sd  # the exporter writes the real file's key names
    loaded = components_from_state_dict(sd, prediction_type="v_prediction" if family == "sd2" else "epsilon")
    assert loaded["family"] == family
    for key, want in RELEASED_UNETS[family].items():
        got = loaded["unet"].config[key]
        assert (list(got) if isinstance(got, tuple) else got) == want, key
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if components.get(name) is None:
            continue
        shapes = {k: v.shape for k, v in loaded[name].state_dict().items()}
        assert shapes == {k: v.shape for k, v in components[name].state_dict().items()}, name
        if name.startswith("text"):
            want_config, got_config = components[name].config, loaded[name].config
            for key in (
                "hidden_size",
                "num_hidden_layers",
                "intermediate_size",
                "num_attention_heads",
                "hidden_act",
            ):
                assert getattr(got_config, key) == getattr(want_config, key), (name, key)


def test_half_precision_file_loads_in_the_requested_dtype(models, tmp_path):
    from safetensors.torch import save_file

    from .ldm_export import to_ldm_state_dict

    components = models("sd1")
    state = {
        k: v.half() if v.is_floating_point() else v for k, v in to_ldm_state_dict(components, "sd1").items()
    }
    save_file(state, str(tmp_path / "sd1-fp16.safetensors"))
    for dtype in (torch.float32, torch.float16):
        loaded = load_single_file(tmp_path / "sd1-fp16.safetensors", dtype=dtype)
        for name in ("unet", "vae", "text_encoder"):
            got = loaded[name].state_dict()
            for key, value in components[name].state_dict().items():
                assert torch.equal(got[key], value.half().to(dtype)), (name, key)


def test_key_variants_of_older_files_load_the_same(models):
    """Early SD1 files: CLIP-L without `text_model.`, stray projection; SDXL: bigG projection as a Linear."""
    from textinv_core.hosts.single_file import components_from_state_dict

    from .ldm_export import to_ldm_state_dict

    sd1 = models("sd1")
    state = to_ldm_state_dict(sd1, "sd1")
    old = "cond_stage_model.transformer."
    state = {k.replace(old + "text_model.", old): v for k, v in state.items()}
    state[old + "text_projection.weight"] = torch.zeros(768, 768)
    assert_same_models(sd1, components_from_state_dict(state))

    sdxl = models("sdxl")
    state = to_ldm_state_dict(sdxl, "sdxl")
    projection = state.pop("conditioner.embedders.1.model.text_projection")
    state["conditioner.embedders.1.model.text_projection.weight"] = projection.T.contiguous()
    assert_same_models(sdxl, components_from_state_dict(state))


class _Skip(torch.nn.Module):
    """Reference for an attention slot the file leaves out: the block's features pass unchanged."""

    def forward(self, hidden_states, *args, return_dict=True, **kwargs):
        return (hidden_states,)


def test_layouts_without_an_exact_diffusers_config_are_fitted(models):
    """ComfyUI-style reductions: attention on only some blocks of a level; mid depth != last level's."""
    import copy

    from textinv_core.hosts.single_file import components_from_state_dict

    from .ldm_export import to_ldm_state_dict

    cases = {  # family: (LDM prefixes the file leaves out, how the reference UNet drops the same)
        "sd2": (["input_blocks.1.1."], lambda u: u.down_blocks[0].attentions.__setitem__(0, _Skip())),
        "sdxl": (
            ["middle_block.1.transformer_blocks.1.", "middle_block.1.transformer_blocks.2."],
            lambda u: setattr(
                u.mid_block.attentions[0],
                "transformer_blocks",
                u.mid_block.attentions[0].transformer_blocks[:1],
            ),
        ),
    }
    for family, (dropped, reduce) in cases.items():
        components = models(family)
        state = to_ldm_state_dict(components, family)
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith(tuple("model.diffusion_model." + d for d in dropped))
        }
        loaded = components_from_state_dict(state)
        assert len(loaded["unet"].ldm_fitted_attention) == 1
        reference = copy.deepcopy(components["unet"])
        reduce(reference)
        assert_same_weights(reference, loaded["unet"])
        assert_same_unet_output({"unet": reference}, loaded)
