"""Sampler settings: defaults, validation naming the field, layering and sources."""

import pytest

from chat.errors import SamplingError
from chat.sampling import DEFAULT_ORDER, SamplerSettings, resolve_sampling


def test_defaults_disable_every_filter_and_penalty():
    s = SamplerSettings()
    assert s.active_stages() == ["temperature"]
    assert s.order == DEFAULT_ORDER
    assert SamplerSettings(temperature=0).greedy


@pytest.mark.parametrize(
    "values, field",
    [
        ({"top_p": "2"}, "top_p"),
        ({"temperature": "abc"}, "temperature"),
        ({"min_p": "-0.1"}, "min_p"),
        ({"mirostat": "3"}, "mirostat"),
        ({"order": "top_k,top_k"}, "order"),
        ({"order": "top_q"}, "order"),
        ({"logit_bias": "12"}, "logit_bias"),
    ],
)
def test_invalid_values_name_the_field(values, field):
    with pytest.raises(SamplingError) as err:
        resolve_sampling([("flags", values)])
    assert field in str(err.value)


def test_later_layers_win_and_sources_are_recorded():
    settings, sources = resolve_sampling(
        [("defaults", {}), ("preset precise", {"temperature": 0.2, "top_k": 40}), ("card teacher", {"temperature": 0.6}), ("flags", {"top_k": "5"})]
    )
    assert settings.temperature == 0.6 and settings.top_k == 5
    assert sources["temperature"] == "card teacher" and sources["top_k"] == "flags"


def test_list_values_from_the_command_line():
    settings, _ = resolve_sampling([("flags", {"order": "top_k,min_p,temperature", "stop": "END,\\n\\n", "logit_bias": "15:-100,27:2.5"})])
    assert settings.order == ("top_k", "min_p", "temperature")
    assert settings.stop == ("END", "\n\n")
    assert settings.logit_bias == {15: -100.0, 27: 2.5}


def test_order_that_leaves_out_a_stage_someone_set_is_refused():
    with pytest.raises(SamplingError) as err:
        resolve_sampling([("card teacher", {"top_p": 0.9, "temperature": 0.7}), ("flags", {"order": "top_k,min_p", "top_k": "40"})])
    assert "leaves out 'top_p'" in str(err.value) and "card teacher" in str(err.value)
    settings, _ = resolve_sampling([("flags", {"order": "top_k,temperature", "top_k": "5"})])  # defaults may be left out
    assert settings.order == ("top_k", "temperature")


def test_non_ascii_stop_strings_survive_the_command_line():
    settings, _ = resolve_sampling([("flags", {"stop": "café,。,END\\n"})])
    assert settings.stop == ("café", "。", "END\n")
