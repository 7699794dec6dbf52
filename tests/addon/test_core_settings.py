"""Panel settings to submit params, checked by the protocol's own validation."""

from __future__ import annotations

import pytest

from blender_addon.core.settings import JobSettings, SettingsError, generate_params, parse_steps, refine_params
from protocol.codec import ProtocolError
from protocol.params import validate_submit


def test_parse_steps_any_subset():
    assert parse_steps("coarse=20, geometry=0,texture=7") == {"coarse": 20, "geometry": 0, "texture": 7}
    assert parse_steps("") == {}


@pytest.mark.parametrize("text", ["coarse", "colour=3", "coarse=-1", "coarse=x", "texture=1,texture=2", "coarse=100001"])
def test_parse_steps_names_the_field_and_value(text):
    with pytest.raises(SettingsError) as info:
        parse_steps(text)
    assert info.value.field == "steps"
    assert "steps" in str(info.value)


def test_generate_params_pass_protocol_validation():
    settings = JobSettings(prompt="  a cow  ", steps={"coarse": 2}, seed=7, texture_size=512)
    params = generate_params(settings)
    assert params["prompt"] == "a cow"
    validated = validate_submit("generate", params, {})
    assert validated.seed == 7 and validated.texture_size == 512


def test_empty_prompt_names_the_field():
    with pytest.raises(SettingsError) as info:
        generate_params(JobSettings(prompt="   "))
    assert info.value.field == "params.prompt"


def test_out_of_range_camera_is_caught_by_protocol_with_its_field():
    settings = JobSettings(prompt="a cow")
    settings.camera.elevation_deg = (50.0, 10.0)
    with pytest.raises(ProtocolError) as info:
        validate_submit("generate", generate_params(settings), {})
    assert info.value.field == "params.camera.elevation_deg"


def test_refine_takes_only_texture_steps():
    with pytest.raises(SettingsError) as info:
        refine_params(JobSettings(prompt="a cow", steps={"coarse": 3}))
    assert "coarse" in str(info.value)
