"""Packaging for jigsaw_ref: every field comes from settings.ini (the nbdev 2 convention)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).with_name("settings.ini"), encoding="utf-8")
s = cfg["DEFAULT"]


def _reqs(key):
    # settings.ini lists requirements space-separated; a spec never contains a space
    return s.get(key, "").split()


scripts = [line for line in s.get("console_scripts", "").split() if line]

setuptools.setup(
    name=s["lib_name"],
    version=s["version"],
    description=s["description"],
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    if Path(__file__).with_name("README.md").exists() else s["description"],
    long_description_content_type="text/markdown",
    author=s["author"],
    author_email=s["author_email"],
    license="Apache-2.0",
    url=s["git_url"],
    packages=setuptools.find_packages(include=[s["lib_path"], s["lib_path"] + ".*"]),
    include_package_data=True,
    python_requires=">=" + s["min_python"],
    install_requires=_reqs("requirements"),
    extras_require={"dev": _reqs("dev_requirements")},
    entry_points={"console_scripts": scripts, "nbdev": [f"{s['lib_path']}={s['lib_path']}._modidx:d"]},
    zip_safe=False,
)
