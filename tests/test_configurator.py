import pytest

from configurator import configure


def defaults():
    return {"lr": 1e-3, "steps": 10, "name": "run", "flag": False, "opt": None, "_private": 1, "os": pytest}


def test_overrides_parse_literals_and_keep_types():
    g = defaults()
    cfg = configure(g, ["--lr=3e-4", "--steps=20", "--name=out/toy", "--flag=True", "--opt=[1, 2]"])
    assert cfg == {"lr": 3e-4, "steps": 20, "name": "out/toy", "flag": True, "opt": [1, 2]}
    assert g["lr"] == 3e-4 and g["steps"] == 20 and g["flag"] is True


def test_int_becomes_float_and_numeric_strings_stay_strings():
    g = defaults()
    configure(g, ["--lr=1", "--name=123"])
    assert g["lr"] == 1.0 and isinstance(g["lr"], float)
    assert g["name"] == "123"


def test_unknown_key_and_type_change_are_errors():
    with pytest.raises(ValueError, match="unknown config key 'stepz'.*steps"):
        configure(defaults(), ["--stepz=3"])
    with pytest.raises(ValueError, match="steps must be int"):
        configure(defaults(), ["--steps=0.5"])
    with pytest.raises(ValueError, match="flag must be bool"):
        configure(defaults(), ["--flag=1"])
    with pytest.raises(ValueError, match="expected --key=value"):
        configure(defaults(), ["--steps"])
    with pytest.raises(ValueError, match="unknown config key '_private'"):
        configure(defaults(), ["--_private=2"])


def test_config_file_applies_known_keys_and_skips_other_stages(tmp_path, capsys):
    path = tmp_path / "cfg.py"
    path.write_text("steps = 5\nname = 'toy'\nother_stage_key = 3\nimport math\nlr = math.sqrt(1e-6)\n")
    g = defaults()
    configure(g, [str(path), "--steps=7"])  # later arguments win
    assert (g["steps"], g["name"], g["lr"]) == (7, "toy", 1e-3)
    assert "other_stage_key" in capsys.readouterr().out
    path.write_text("steps = 'many'\n")
    with pytest.raises(ValueError, match="cfg.py: steps must be int"):
        configure(defaults(), [str(path)])
    with pytest.raises(ValueError, match="cannot read config file"):
        configure(defaults(), [str(tmp_path / "missing.py")])
