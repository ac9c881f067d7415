"""setup.py exists only for what pyproject.toml cannot say (cffi_modules, the guest build)."""

from setuptools import setup

setup()
