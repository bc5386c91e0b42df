# All metadata lives in pyproject.toml; this file exists so that `pip install -e .` works with
# older setuptools and so that the native-ops issue can add an optional C++ extension here.
from setuptools import setup

setup()
