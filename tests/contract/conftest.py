"""Fixtures for the contract suites (one per port). Each port's fixtures live in a
module under tests/ and are imported here, one line each."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the fixture modules

from state_fixtures import *  # noqa: F403 - StateStore backends (state_store, state_clock, ...)
