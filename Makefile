# Developer entry points; see README.md.
PYTHON ?= python3
DEBS = qemu-utils qemu-system-common nbdkit libnbd-bin rpm fio
PIP_PACKAGES = psutil python-daemon qemu.qmp pytest hypothesis vermin ruff mypy types-psutil

.PHONY: deps lint test demo demo-copy bench rpm reliability

# Everything the demo, the tests and the linters need (installed only when
# missing): Python packages from PyPI and the
# NBD servers/tools (nbdfuse for the block device) and fio (bench) from Debian's packages (root needed for apt-get).
deps:
	@$(PYTHON) -c 'import psutil, daemon, qemu.qmp, pytest, hypothesis, vermin, ruff, mypy' 2>/dev/null || \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore $(PIP_PACKAGES)
	@if ! command -v qemu-nbd >/dev/null || ! command -v qemu-storage-daemon >/dev/null || ! command -v nbdkit >/dev/null || ! command -v nbdcopy >/dev/null || ! command -v nbdfuse >/dev/null || ! command -v fio >/dev/null || ! command -v rpmbuild >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS); fi

# Ruff (style, bugs, annotations) and mypy (types); settings in
# pyproject.toml and setup.cfg.
lint:
	$(PYTHON) -m ruff check plugin bin/dispatch tests bench
	$(PYTHON) -m mypy

test:
	$(PYTHON) -m pytest -q

# A live storage migration between two hosts (two state directories), as
# the toolstacks drive it, the guest writing through the volume's block
# device (ends "identical").
demo:
	PYTHON=$(PYTHON) sh tools/demo-migrate.sh

# A Data.copy into an NBD target, watched with Task.stat.
demo-copy:
	PYTHON=$(PYTHON) sh tools/demo-copy.sh

# Source RPM and noarch RPM from the working tree into ./rpmbuild/ (packaging/README.md).
rpm:
	bash tools/build-rpm.sh

# Every benchmark figure beside its baseline, as a table and as JSON in
# bench/results/latest.json (a few minutes; sizes: python3 bench/run.py --help).
bench:
	$(PYTHON) bench/run.py

# The reliability suite alone (make test runs it too).
reliability:
	$(PYTHON) -m pytest -m reliability -rA tests/test_reliability_*.py
