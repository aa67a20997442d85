# The two commands of the README. Both set everything up first (idempotent).
.PHONY: setup app test lint bench

setup:
	./scripts/setup.sh

app: setup
	HF_HUB_OFFLINE=1 .venv/bin/visrl-app

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check visrl visrl_app tests bench
