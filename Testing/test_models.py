"""Network presets, model folders (official layout and ours), strict loading and conditioning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lctfound.cli import main as cli_main
from lctfound.errors import CheckpointError, LCTfoundError
from lctfound.models import PRESETS, build_unet, describe_unet, list_models, load_model, resolve_model, save_model
from lctfound.models.bundle import WEIGHTS_NAME, add_prompt_cache
from lctfound.models.conditioning import LearnedConditionEncoder, PromptCacheEncoder, condition_prompt
from lctfound.models.presets import OFFICIAL_PARAMETERS, OFFICIAL_TENSORS
from lctfound.windows import NULL_PROMPT, WINDOWS

from model_factory import save_official_layout, save_tiny_bert, tiny_model


def test_official_preset_counts_on_meta_device():
    info = describe_unet(build_unet("official", meta=True))
    assert info["parameters"] == OFFICIAL_PARAMETERS == 289_984_771
    assert info["tensors"] == OFFICIAL_TENSORS == 752
    assert info["feature_channels_per_timestep"] == 960
    assert PRESETS["official"].feature_channels == 3840


def test_official_key_shapes_match_reference():
    state = build_unet("official", meta=True).state_dict()
    assert tuple(state["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape) == (128, 1280)
    assert tuple(state["encoder_hid_proj.weight"].shape) == (1280, 768)
    assert tuple(state["conv_in.weight"].shape) == (64, 3, 3, 3)
    assert tuple(state["time_embedding.linear_1.weight"].shape) == (256, 64)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "official"])
def test_cpu_presets_keep_hook_points_and_cross_attention(name):
    unet = build_unet(name, meta=True)
    assert len(unet.up_blocks) == 5 and len(unet.down_blocks) == 5
    assert any("CrossAttn" in type(block).__name__ for block in unet.up_blocks[1:])
    assert unet.config.encoder_hid_dim == 768
    assert describe_unet(unet)["parameters"] < OFFICIAL_PARAMETERS / 8


def test_cli_inspect_official_meta(capsys):
    assert cli_main(["model", "inspect", "--config", "official", "--meta"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 289984771" in out and "tensors: 752" in out


def test_official_layout_loads_strictly(tmp_path):
    folder = save_official_layout(tmp_path / "release")
    reference = load_file(str(folder / "unet" / WEIGHTS_NAME))
    model = load_model(folder)
    assert model.metadata["preset"] == "cpu-tiny"  # recognised from the config
    for name, tensor in model.unet.state_dict().items():
        assert torch.equal(tensor, reference[name])
    # The unet folder itself is accepted too, as the official downstream code passes it.
    assert load_model(folder / "unet").unet.config.sample_size == 64
    with pytest.raises(LCTfoundError, match="prompt vectors"):
        model.condition("lung")


def _break(folder, edit):
    path = folder / "unet" / WEIGHTS_NAME
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


def test_missing_key_is_refused(tmp_path):
    folder = save_official_layout(tmp_path / "m")
    _break(folder, lambda s: s.pop("conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: 1 tensor\(s\) missing, e.g. conv_out.bias"):
        load_model(folder)


def test_wrong_shape_is_refused(tmp_path):
    folder = save_official_layout(tmp_path / "m")
    _break(folder, lambda s: s.__setitem__("conv_in.weight", torch.zeros(16, 3, 5, 5)))
    with pytest.raises(CheckpointError, match=r"tensor conv_in.weight has shape \(16, 3, 5, 5\), the config needs \(16, 3, 3, 3\)"):
        load_model(folder)


def test_unexpected_key_is_refused(tmp_path):
    folder = save_official_layout(tmp_path / "m")
    _break(folder, lambda s: s.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(folder)


def test_truncated_file_is_refused(tmp_path):
    folder = save_official_layout(tmp_path / "m")
    path = folder / "unet" / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_foreign_and_prefixed_files_are_refused(tmp_path):
    folder = save_official_layout(tmp_path / "m")
    _break(folder, lambda s: [s.__setitem__(f"module.{k}", s.pop(k)) for k in list(s)])
    with pytest.raises(CheckpointError, match="foreign file or a prefixed state dict"):
        load_model(folder)
    garbage = save_official_layout(tmp_path / "g") / "unet" / WEIGHTS_NAME
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "g")


def test_pickled_weights_are_never_loaded(tmp_path):
    folder = save_official_layout(tmp_path / "m")
    (folder / "unet" / WEIGHTS_NAME).rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_model(folder / "unet" / "diffusion_pytorch_model.bin")


def test_missing_folder_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_model(tmp_path / "empty")
    folder = save_official_layout(tmp_path / "m")
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(folder)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="LCTfound needs a UNet2DConditionModel"):
        load_model(folder)


def test_our_folder_round_trip_fp16_with_metadata(tmp_path):
    model = tiny_model()
    folder = save_model(model, tmp_path / "ours", weights_dtype=torch.float16,
                        extra_metadata={"name": "unit-test", "training": {"data_fingerprint": "abc"}})
    metadata = json.loads((folder / "lctfound.json").read_text())
    assert metadata["preset"] == "cpu-tiny" and metadata["weights_dtype"] == "float16"
    assert set(metadata["files"]) >= {"unet/config.json", "unet/" + WEIGHTS_NAME,
                                      "conditioning/condition_encoder.safetensors", "scheduler/scheduler_config.json"}
    loaded = load_model(folder)
    assert loaded.unet.dtype == torch.float32
    for name, tensor in model.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], tensor.half().float())
    assert torch.equal(loaded.condition("lung"), model.condition("lung"))
    # The folder is also a valid diffusers model, loadable without LCTfound.
    from diffusers import UNet2DConditionModel
    assert UNet2DConditionModel.from_pretrained(folder / "unet").config.sample_size == 64
    # A changed file is caught by its checksum.
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(folder)


def test_save_never_overwrites_silently(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    with pytest.raises(LCTfoundError, match="already exists"):
        save_model(tiny_model(), tmp_path / "m")


def test_hf_cache_loading_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--lab--lctfound-mini" / "snapshots" / ("0" * 40)
    save_official_layout(snapshot)
    (cache / "models--lab--lctfound-mini" / "refs").mkdir(parents=True)
    (cache / "models--lab--lctfound-mini" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    model = load_model("lab/lctfound-mini")
    assert model.unet.config.sample_size == 64
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_model("lab/absent-model")


def test_condition_prompts_match_official_strings():
    assert condition_prompt("lung") == "window width and window level is 1500 and -500."
    assert condition_prompt("mediastinal") == "window width and window level is 400 and 0."
    assert condition_prompt("mediastinal", "纵隔肿瘤").endswith("0.this image may related to 纵隔肿瘤")


def test_learned_encoder_windows_diseases_and_null():
    encoder = LearnedConditionEncoder(diseases=["PAP"])
    null = encoder.encode([NULL_PROMPT])
    assert torch.allclose(null, encoder.encode([""]))
    assert not torch.allclose(null, encoder.encode([condition_prompt("lung")]))
    with_disease = encoder.encode([condition_prompt("lung", "PAP")])
    torch.nn.init.normal_(encoder.disease_embedding.weight)
    assert not torch.allclose(with_disease, encoder.encode([condition_prompt("lung", "PAP")]))
    lung, mediastinal = encoder.encode([condition_prompt("lung"), "mediastinal"])
    assert not torch.allclose(lung, mediastinal)
    with pytest.raises(LCTfoundError, match="disease labels"):
        encoder.encode([condition_prompt("lung", "unknown")])


def test_bert_prompt_cache_and_add_prompts(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert")
    folder = save_official_layout(tmp_path / "release")
    path = add_prompt_cache(folder, bert, [w.prompt() for w in WINDOWS.values()] + [NULL_PROMPT])
    assert path == folder / "conditioning" / "prompt_cache.safetensors"
    model = load_model(folder)
    assert isinstance(model.condition_encoder, PromptCacheEncoder)
    from lctfound.models.conditioning import BertPromptEncoder
    live = BertPromptEncoder(bert).encode([condition_prompt("lung")])
    torch.testing.assert_close(model.condition("lung"), live)
    assert model.condition("lung").shape == (1, 1, 768)
    with pytest.raises(LCTfoundError, match="not in this model's prompt cache"):
        model.encode_prompts(["window width and window level is 350 and 40."])


def test_registry_lists_user_and_folder_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    save_model(tiny_model(), tmp_path / "cache" / "models" / "my-model", extra_metadata={"name": "my-model"})
    save_official_layout(tmp_path / "release")
    entries = list_models([tmp_path / "release"])
    by_name = {entry.name: entry for entry in entries}
    assert by_name["my-model"].source == "user" and by_name["my-model"].preset == "cpu-tiny"
    assert by_name["release"].source == "folder"
    assert resolve_model("my-model") == tmp_path / "cache" / "models" / "my-model"
    with pytest.raises(LCTfoundError, match="not found"):
        resolve_model("no-such-model")


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lctfound", "model", "inspect", str(tmp_path / "missing")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
