"""The one configuration schema: defaults, YAML, overrides and the errors users see."""

from __future__ import annotations

import pytest

from common.config import ConfigError, FedsegConfig, describe_options, load_config


def test_defaults_are_the_documented_model():
    cfg = load_config()
    assert cfg.model.channels == [16, 32, 64, 128, 256]
    assert cfg.model.strides == [2, 2, 2, 2]
    assert cfg.model.num_res_units == 2
    assert cfg.train.norm_mode == "local"


def test_every_option_has_a_default_and_a_description():
    rows = describe_options()
    assert len(rows) > 20
    for key, _default, doc in rows:
        assert doc.strip(), key


def test_misspelt_key_names_key_file_and_closest(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text("train:\n  proximal_mu: 0.1\n  lcoal_steps: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.lcoal_steps" in message
    assert str(path) in message
    assert "local_steps" in message


def test_unknown_section_suggests_the_closest(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("stie:\n  name: a\n")
    with pytest.raises(ConfigError, match="'site'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train:\n  local_steps: many\n", "expected int"),
        ("train:\n  norm_mode: fedbn\n", "'local', 'stats', 'shared'"),
        ("model:\n  channels: 16\n", "expected a list"),
        ("data:\n  patch_size: [30, 30, 30]\n", "divisible by 16"),
        ("train: [1, 2]\n", "must be a mapping"),
        ("train:\n  lr: [0.1\n", "not valid YAML"),
    ],
)
def test_invalid_values_are_explained(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(path)


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text("train:\n  lr: 0.1\n  local_steps: 3\n")
    cfg = load_config(path, ["train.lr=0.5", "federation.rounds=7"])
    assert cfg.train.lr == 0.5
    assert cfg.train.local_steps == 3
    assert cfg.federation.rounds == 7


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["rounds=3"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_round_trip_keeps_every_value():
    cfg = load_config(None, ["train.lr=0.002", "model.norm=batch"])
    from common.config import from_yaml_text

    again = from_yaml_text(cfg.to_yaml(), "round trip")
    assert again == cfg
    assert again.sha256() == cfg.sha256()
    assert isinstance(FedsegConfig().to_dict()["model"], dict)


def test_simulated_sites_are_a_typed_mapping_that_round_trips(tmp_path):
    from common.config import SimulatedSite, from_yaml_text

    path = tmp_path / "sim.yaml"
    path.write_text("simulation:\n  sites:\n    hospital-a: {data_dir: /data/a}\n"
                    "    hospital-b: {data_dir: /data/b, held_out: true}\n")
    cfg = load_config(path, ["simulation.sites.hospital-a.held_out=false"])
    assert cfg.simulation.sites == {"hospital-a": SimulatedSite("/data/a", False),
                                    "hospital-b": SimulatedSite("/data/b", True)}
    assert from_yaml_text(cfg.to_yaml(), "round trip") == cfg
    assert load_config().simulation.sites == {}


@pytest.mark.parametrize("text, fragment", [
    ("simulation:\n  sites:\n    a: {data_dir: /x, heldout: true}\n",
     "unknown key 'simulation.sites.a.heldout'. Did you mean 'held_out'?"),
    ("simulation:\n  sites:\n    a: {data_dir: /x, held_out: maybe}\n", "simulation.sites.a.held_out: expected bool"),
    ("simulation:\n  sites:\n    a: /x\n", "'simulation.sites.a' must be a mapping"),
    ("simulation:\n  sites: [a, b]\n", "simulation.sites: expected a mapping"),
    ("simulation:\n  sites:\n    a: {held_out: false}\n", "simulation.sites.a.data_dir is empty"),
    ("simulation:\n  sites:\n    a: {data_dir: /x, held_out: true}\n", "at least one must train"),
])
def test_simulated_site_errors_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
