"""Sampler settings: defaults, validation naming the field, layering and sources."""

import pytest

from chat.errors import SamplingError
from chat.sampling import DEFAULT_ORDER, SamplerSettings, resolve_sampling
from chat.stages import SamplerStage, StageParams


class NoParams(StageParams):
    pass


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
        [
            ("defaults", {}),
            ("preset precise", {"temperature": 0.2, "top_k": 40}),
            ("card teacher", {"temperature": 0.6}),
            ("flags", {"top_k": "5"}),
        ]
    )
    assert settings.temperature == 0.6 and settings.top_k == 5
    assert sources["temperature"] == "card teacher" and sources["top_k"] == "flags"


def test_list_values_from_the_command_line():
    flags = {"order": "top_k,min_p,temperature", "stop": "END,\\n\\n", "logit_bias": "15:-100,27:2.5"}
    settings, _ = resolve_sampling([("flags", flags)])
    assert settings.order == ("top_k", "min_p", "temperature")
    assert settings.stop == ("END", "\n\n")
    assert settings.logit_bias == {15: -100.0, 27: 2.5}


def test_order_that_leaves_out_a_stage_someone_set_is_refused():
    with pytest.raises(SamplingError) as err:
        resolve_sampling(
            [("card teacher", {"top_p": 0.9, "temperature": 0.7}), ("flags", {"order": "top_k,min_p", "top_k": "40"})]
        )
    assert "leaves out 'top_p'" in str(err.value) and "card teacher" in str(err.value)
    # defaults may be left out
    settings, _ = resolve_sampling([("flags", {"order": "top_k,temperature", "top_k": "5"})])
    assert settings.order == ("top_k", "temperature")


def test_non_ascii_stop_strings_survive_the_command_line():
    settings, _ = resolve_sampling([("flags", {"stop": "café,。,END\\n"})])
    assert settings.stop == ("café", "。", "END\n")


@pytest.mark.parametrize("raw, version", [("0", 0), ("1", 1), (" 2 ", 2)])
def test_mirostat_from_the_command_line_is_a_number(raw, version):
    settings, _ = resolve_sampling([("flags", {"mirostat": raw})])
    assert settings.mirostat == version


def test_mirostat_3_is_refused_naming_the_allowed_values():
    with pytest.raises(SamplingError, match=r"mirostat=3: .*0, 1 or 2"):
        resolve_sampling([("flags", {"mirostat": "3"})])


def test_the_stages_passed_in_decide_what_order_may_name():
    stage = SamplerStage("shout", "upper-case everything (test stage)", NoParams, lambda x, c, p: x.copy())
    s = SamplerSettings.model_validate({"order": ("top_k", "shout")}, context={"stages": {"shout": stage}})
    assert s.order == ("top_k", "shout")
    with pytest.raises(ValueError, match="unknown stage 'shuot'; did you mean 'shout'"):
        SamplerSettings.model_validate({"order": ("shuot",)}, context={"stages": {"shout": stage}})
    with pytest.raises(SamplingError, match="unknown sampler stage 'shout'"):
        resolve_sampling([("flags", {"shout.loud": "1"})], stages={})
    settings, sources = resolve_sampling([("card x", {"order": "shout,temperature"})], stages={"shout": stage})
    assert settings.order == ("shout", "temperature") and sources["order"] == "card x"


def test_without_stages_validation_knows_the_installed_plugins():
    """Nothing has to run first: the installed plugins' stages are looked up when a setting names one."""
    settings, _ = resolve_sampling([("card x", {"word_filter": {"ban": ["delve"]}})])
    assert settings.order[0] == "word_filter" and settings.stage_params == {"word_filter": {"ban": ["delve"]}}
    assert SamplerSettings(order=("word_filter", "temperature")).order[0] == "word_filter"
    with pytest.raises(SamplingError, match="unknown sampler stage 'word_filtr'.*did you mean 'word_filter'"):
        resolve_sampling([("card x", {"word_filtr": {"ban": ["delve"]}})])
