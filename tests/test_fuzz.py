"""The seeded fuzz run over everything `elastic slice` reads (tests/fuzz_checkpoint.py): every
mutated checkpoint either slices to the clean run's output or is refused with exit 2 and one
message. A longer run: ``ELASTIC_FUZZ_CASES=3000 pytest tests/test_fuzz.py`` or
``python tests/fuzz_checkpoint.py --cases 3000``."""

from __future__ import annotations

import os

import pytest

from fuzz_checkpoint import run

pytestmark = pytest.mark.heavy  # 300 slices


def test_fuzzed_checkpoints_slice_identically_or_fail_with_one_message(tmp_path):
    cases = int(os.environ.get("ELASTIC_FUZZ_CASES", "300"))
    counts, failures = run(cases, seed=int(os.environ.get("ELASTIC_FUZZ_SEED", "0")), workdir=tmp_path)
    print(dict(counts))
    assert failures == [], "\n".join(failures[:20])
    assert counts["exit 2, one message"] > cases // 2 and counts["exit 0, identical"] > 0  # both paths ran
