import pytest

from quept.config import CalibConfig, ConfigError, ElasticSpec, QuEPTConfig


def test_spec_defaults_and_prefixes():
    s = ElasticSpec()
    assert s.bits == (8, 7, 6, 5, 4, 3, 2)
    assert s.group_of(8) == 0 and s.group_of(2) == 3
    assert [s.rank_prefix(g) for g in range(4)] == [8, 16, 24, 32]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"bit_groups": ((8,), (9,))}, "outside 2..8"),
        ({"bit_groups": ((8, 1),)}, "outside 2..8"),
        ({"bit_groups": ((3,), (8,)), "ranks": (1, 1), "merge_weights": (0.5, 0.5)}, "ordered"),
        ({"ranks": (1, 2)}, "ranks has 2"),
        ({"merge_weights": (0.5, 0.5, 0.5, 0.5)}, "sum to 1"),
        ({"merge_top_p": 1.5}, "merge_top_p"),
        ({"group_size": ((9, 64),)}, "no bit group"),
        ({"default_group_size": -4}, "group size"),
    ],
)
def test_spec_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        ElasticSpec(**kw)


def test_config_round_trip():
    cfg = QuEPTConfig(
        spec=ElasticSpec(group_size=((2, 32),), ranks=(1, 2, 3, 4)),
        calib=CalibConfig(n_samples=4, batch_size=2),
    )
    again = QuEPTConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.spec.group_size_for(2) == 32 and again.spec.group_size_for(4) == 64


def test_config_rejects_unknown_version_and_fields():
    d = QuEPTConfig().to_dict()
    with pytest.raises(ConfigError, match="version"):
        QuEPTConfig.from_dict({**d, "version": 99})
    with pytest.raises(ConfigError, match="unknown"):
        CalibConfig.from_dict({"n_sample": 3})
    with pytest.raises(ConfigError, match="batch_size"):
        CalibConfig(n_samples=2, batch_size=4)
