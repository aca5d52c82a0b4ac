"""Package discovery for qtoy's folder-to-import-name mapping.

The repository keeps short folder names (`registry/`, `plugins/`, `cli/`), but the wheel must not
squat generic top-level import names, so each folder installs under a namespaced name. setuptools
cannot express "find the subpackages of a renamed folder" in pyproject.toml alone, hence this file.
"""

from setuptools import find_packages, setup

IMPORT_NAME_TO_FOLDER = {
    "qtoy_core": "qtoy_core",
    "qtoy_registry": "registry",
    "qtoy_plugins": "plugins",
    "qtoy_cli": "cli",
}

packages = []
for import_name, folder in IMPORT_NAME_TO_FOLDER.items():
    packages.append(import_name)
    packages += [f"{import_name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=IMPORT_NAME_TO_FOLDER)
