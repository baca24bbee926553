"""`atoll config show`: the effective configuration (defaults, then the file, then --set), which loads back as
the same configuration, and bad configuration as one line naming the field."""

import pytest
import yaml
from helpers import assert_one_line_error, cli

from node.config import load_config


def test_config_show_prints_a_config_that_loads_back_the_same(tmp_path):
    f = tmp_path / "n.yaml"
    f.write_text("train: {rounds: 7}\ncomm: {topology: torus}\n")
    r = cli("config", "show", "-c", str(f), "--set", "train.local_steps=3", "--set", "comm.topology=exponential")
    assert r.exit_code == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["train"]["rounds"] == 7 and shown["train"]["local_steps"] == 3  # file, then --set
    assert shown["comm"]["topology"] == "exponential"  # --set wins over the file
    again = tmp_path / "shown.yaml"
    again.write_text(r.stdout)
    assert load_config(again) == load_config(f, {"train.local_steps": 3, "comm.topology": "exponential"})


@pytest.mark.parametrize(
    "sets,message",
    [
        (["security.attack=teleport"], "security.attack"),
        (["security.attack=sign_flip", "security.attack_params={scale: 2, volume: 11}"], "attack_params"),
        (["security.attack_params={scale: 2}"], "without an attack"),
        (["security.aggregator=krum", "comm.exchange=logits"], "need comm.exchange model"),
        (["security.byzantine_fraction=0.7"], "byzantine_fraction"),
        (["train.rounds=-1"], "train.rounds"),
        (["nope=1"], "nope"),
        (["train.rounds"], "--set"),
    ],
)
def test_bad_config_is_one_clear_line(sets, message):
    assert_one_line_error(cli("config", "show", *[a for s in sets for a in ("--set", s)]), message)


def test_a_missing_or_broken_file_is_one_clear_line(tmp_path):
    assert_one_line_error(cli("config", "show", "-c", str(tmp_path / "none.yaml")), "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {rounds: [\n")
    assert_one_line_error(cli("config", "show", "-c", str(broken)), "broken.yaml")
