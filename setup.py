"""Which files go in the package; all other metadata lives in pyproject.toml.

`configs/` stays where GPT-Neo's users look for it (the checkout's root) and is shipped as
the package `gpt_neo.presets`, so that `gpt-neo --model gpt_neo_125M` finds the released
configs by name after a plain `pip install`, from any directory."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["gpt_neo", "gpt_neo.*"]), "gpt_neo.presets"],
    package_dir={"gpt_neo.presets": "configs"},
    package_data={"gpt_neo.presets": ["*.json", "dataset_configs/*.json"]},
)
