"""Package discovery, which pyproject.toml alone cannot express with conf/ living outside the package.

Every package under ``sparsecomm/`` is found, never listed by hand, and ``conf/`` (the Hydra app's
YAML configs) is installed as the package ``sparsecomm.conf``. Everything else is in pyproject.toml;
``tests/test_wheel.py`` checks that the built wheel and sdist carry every module and every YAML.
"""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["sparsecomm", "sparsecomm.*"]), "sparsecomm.conf"],
    package_dir={"sparsecomm.conf": "conf"},
)
