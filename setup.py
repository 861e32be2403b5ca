"""Packages for setuptools: the code packages, and data/ installed as the package ``headwise_data``.

(pyproject.toml holds the metadata; only this mapping needs code: ``packages.find`` cannot add a
package whose folder has another name. See analyses/data.py for how the data is found.)
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["probe*", "analyses*", "dashboards*"]) + ["headwise_data"],
      package_dir={"headwise_data": "data"})
